"""Numba's cache=True from an installed (not editable) package, whose folder is read-only."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEP = """
import json, numpy as np, fastcnn
from fastcnn.kernels import numba_jit
from fastcnn.models import simple_cnn
net = simple_cnn()
x = np.zeros((2, 1, 28, 28), np.float32)
net.train_step(x, np.array([1, 2]), fastcnn.SGD(0.1))
from numba.core.dispatcher import Dispatcher
kernels = [v for v in vars(numba_jit).values() if isinstance(v, Dispatcher)]
print(json.dumps({"file": fastcnn.__file__,
                  "hits": sum(sum(k.stats.cache_hits.values()) for k in kernels),
                  "misses": sum(sum(k.stats.cache_misses.values()) for k in kernels)}))
"""


def read_only_runner(target):
    """A command prefix that runs a command with ``target`` read-only, even for root."""
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", str(target)], check=True)
        return []
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    mount = f"mount --bind {target} {target} && mount -o remount,ro,bind {target} {target}"
    return ["unshare", "-m", "sh", "-c", mount + ' && exec "$@"', "sh"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert (target / "fastcnn" / "kernels" / "numba_jit.py").is_file()
    return target


def test_cache_works_from_a_read_only_install(installed, tmp_path):
    prefix = read_only_runner(installed)
    if prefix is None:
        pytest.skip("cannot make a read-only folder here (root without unshare -m)")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CACHE")}
    env.update(PYTHONPATH=str(installed), HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))

    def start():
        run = subprocess.run([*prefix, sys.executable, "-c", STEP], capture_output=True,
                             text=True, env=env, cwd=tmp_path, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        import json

        return json.loads(run.stdout.strip().splitlines()[-1])

    first = start()
    assert first["file"].startswith(str(installed))  # the installed copy, not the checkout
    assert first["misses"] > 0 and first["hits"] == 0  # compiled, nothing cached yet
    cached = list((home / ".cache").rglob("*.nbi"))
    assert cached, "Numba wrote no cache index under the user's cache folder"
    assert not list(installed.rglob("*.nbi"))  # nothing could be written beside the sources
    second = start()
    assert second["hits"] > 0 and second["misses"] == 0  # loaded from the fallback cache


def test_a_slow_first_batch_says_it_is_compiling_and_a_fast_one_says_nothing():
    import time

    from fastcnn.jit_cost import CompileNotice

    lines = []
    with CompileNotice(after_s=0.01, write=lines.append):
        time.sleep(0.3)  # a batch that compiles
    assert len(lines) == 2
    assert "compiling the numba kernels" in lines[0] and "once" not in lines[1]
    assert lines[1].startswith("fastcnn: compiled in ")
    lines.clear()
    with CompileNotice(after_s=5.0, write=lines.append):
        pass  # kernels loaded from the cache
    with CompileNotice(enabled=False, after_s=0.0, write=lines.append):
        time.sleep(0.05)
    assert lines == []
