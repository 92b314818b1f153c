import subprocess
import sys

import pytest

import fastcnn
from fastcnn import threads


@pytest.fixture
def restore_threads():
    before, fixed = threads.get_num_threads(), list(threads._fixed)
    yield
    threads.set_num_threads(before)
    threads._fixed[:] = fixed


def test_set_num_threads_sets_numba_and_blas(restore_threads):
    fastcnn.set_num_threads(1)
    assert fastcnn.get_num_threads() == 1
    if threads.blas_num_threads() is not None:  # an OpenBLAS is loaded (NumPy's wheels)
        assert threads.blas_num_threads() == 1
    fastcnn.set_num_threads(threads.max_threads())
    assert fastcnn.get_num_threads() == threads.max_threads()


def test_set_num_threads_rejects_bad_counts():
    with pytest.raises(ValueError, match=f"between 1 and {threads.max_threads()}"):
        fastcnn.set_num_threads(threads.max_threads() + 1)
    with pytest.raises(ValueError, match="got 0"):
        fastcnn.set_num_threads(0)
    with pytest.raises(TypeError):
        fastcnn.set_num_threads(1.5)


def test_training_gives_the_same_result_on_one_thread_and_all(restore_threads, rng):
    """Each thread writes its own slice: the thread count must not change the numbers."""
    import numpy as np

    from fastcnn.models import complex_cnn

    x = rng.random((6, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 6)
    results = []
    for n in (1, threads.max_threads()):
        fastcnn.set_num_threads(n)
        with fastcnn.use_backend("numba"):
            net = complex_cnn(seed=0)
            net.fit(x, y, epochs=1, batch_size=3, seed=0)
        results.append([p for layer in net.layers for p in layer.params.values()])
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_same_bits_on_1_3_8_and_16_threads(tmp_path):
    """The work split for many cores (tasks across batch, rows, filter and channel blocks, the
    weight gradient's fixed parts) never depends on the thread count: a training run and a
    batch-32 convolution backward give the same bits on 1, 3, 8 and 16 threads (16 threads
    forced on whatever cores this machine has: NUMBA_NUM_THREADS=16)."""
    import os

    code = (
        "import hashlib, numpy as np, fastcnn\n"
        "from fastcnn.kernels import numba_jit as k\n"
        "from fastcnn.models import complex_cnn\n"
        "rng = np.random.default_rng(7)\n"
        "x = rng.random((6, 1, 28, 28)).astype(np.float32); y = rng.integers(0, 10, 6)\n"
        "a = rng.standard_normal((32, 32, 28, 28)).astype(np.float32)\n"
        "w = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)\n"
        "b = np.zeros(32, np.float32)\n"
        "for n in (1, 3, 8, 16):\n"
        "    fastcnn.set_num_threads(n)\n"
        "    h = hashlib.sha256()\n"
        "    with fastcnn.use_backend('numba'):\n"
        "        net = complex_cnn(seed=0)\n"
        "        net.fit(x, y, epochs=1, batch_size=3, seed=0, verbose=False)\n"
        "    for layer in net.layers:\n"
        "        for p in layer.params.values(): h.update(p.tobytes())\n"
        "    out, saved = k.conv2d_relu_forward(a, w, b, 1, 1)\n"
        "    for part in k.conv2d_relu_backward(a, out - 0.5, out, w, 1, 1, True, saved):\n"
        "        h.update(part.tobytes())\n"
        "    print(n, fastcnn.get_num_threads(), h.hexdigest())\n")
    env = dict(os.environ, NUMBA_NUM_THREADS="16")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line.split() for line in run.stdout.splitlines()]
    assert [(n, used) for n, used, _ in lines] == [(str(n), str(n)) for n in (1, 3, 8, 16)]
    assert len({digest for *_, digest in lines}) == 1, run.stdout


def test_info_shows_threads_and_threading_layer():
    run = subprocess.run([sys.executable, "-m", "fastcnn.cli", "info", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "1 threads" in run.stdout and "threading layer" in run.stdout


def test_threading_layer_is_known_in_a_fresh_process():
    """Before any parallel kernel ran, threading_layer() runs one (not a kernel's serial twin,
    which would leave the layer unstarted) and names it."""
    code = "from fastcnn import threads; print(threads.threading_layer())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() in {"tbb", "omp", "workqueue"}


def test_retain_freed_memory_reports_whether_it_applied():
    import platform

    from fastcnn import memory

    applied = memory.retain_freed_memory()
    assert isinstance(applied, bool)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied


@pytest.mark.parametrize("env", ["", "0"])
def test_the_first_kernel_load_keeps_freed_memory_unless_told_not_to(env):
    """Library users (not only the CLI) get glibc's thresholds fixed, once the kernels load."""
    import os
    import platform

    code = ("import fastcnn, numpy as np\n"
            "from fastcnn import memory, models\n"
            "assert not memory._status\n"  # importing alone changes nothing
            "models.build('simple', seed=0).forward(np.zeros((1, 1, 28, 28), np.float32))\n"
            "print(memory._status[0])\n")
    environ = dict(os.environ, FASTCNN_RETAIN_FREED_MEMORY=env)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=environ)
    assert run.returncode == 0, run.stderr
    if env == "0":
        assert run.stdout.startswith("malloc left alone (FASTCNN_RETAIN_FREED_MEMORY=0)")
    elif platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert run.stdout.startswith("freed memory kept for reuse")


def busy_cores():
    return None  # as where /proc/stat can't be read: no idle-core signal


class FakeClock:
    """A clock the test advances: each batch 'takes' cost[thread count] seconds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run_batches(tuner, clock, cost, count, images=10):
    used = []
    for _ in range(count):
        tuner.start()
        used.append(threads.get_num_threads())
        clock.now += cost(threads.get_num_threads())
        tuner.stop(images)
    return used


needs_two = pytest.mark.skipif(threads.max_threads() < 2, reason="tuning needs 2+ threads")


@needs_two
def test_the_tuner_picks_the_faster_count_and_goes_back_to_all_cores(restore_threads):
    threads.set_num_threads("auto")
    top = threads.max_threads()
    clock = FakeClock()
    with threads.Tuner(reprobe_s=1e9, clock=clock, cpu_times=busy_cores) as tuner:
        used = run_batches(tuner, clock, lambda n: 1.0 if n == 1 else 3.0, 60)
        assert used[-10:] == [1] * 10  # one thread was 3x faster: chosen
        assert tuner.most_used() == 1
    assert threads.get_num_threads() == top
    clock = FakeClock()
    with threads.Tuner(reprobe_s=1e9, clock=clock, cpu_times=busy_cores) as tuner:
        used = run_batches(tuner, clock, lambda n: 1.0 / n, 60)
        assert used[-10:] == [top] * 10  # all cores fastest: kept
        assert set(used) == set(tuner.candidates)  # after trying every candidate


@needs_two
def test_the_tuner_probes_again_when_batches_slow_down(restore_threads):
    threads.set_num_threads("auto")
    top = threads.max_threads()
    clock = FakeClock()
    busy = [False]  # another process takes the cores: all cores become 10x slower

    def cost(n):
        return (10.0 if busy[0] and n > 1 else 1.0) / (n if n == top else 1)

    with threads.Tuner(reprobe_s=1e9, clock=clock, cpu_times=busy_cores) as tuner:
        assert run_batches(tuner, clock, cost, 40)[-5:] == [top] * 5
        busy[0] = True
        assert run_batches(tuner, clock, cost, 60)[-5:] == [1] * 5


@needs_two
def test_the_tuner_probes_again_after_a_while(restore_threads):
    threads.set_num_threads("auto")
    clock = FakeClock()
    fast = [1]

    def cost(n):
        return 1.0 if n == fast[0] else 2.0

    with threads.Tuner(reprobe_s=100.0, clock=clock, cpu_times=busy_cores) as tuner:
        assert run_batches(tuner, clock, cost, 40)[-5:] == [1] * 5
        fast[0] = threads.max_threads()  # one thread is no longer the fastest
        used = run_batches(tuner, clock, cost, 200)
        assert used[-5:] == [threads.max_threads()] * 5


def machine(clock, top, others):
    """Fake /proc/stat and own CPU time, advancing with the fake clock: every core busy, this
    process using all but `others` of them."""
    def cpu_times():  # (idle, all) jiffies: none idle
        return 0.0, clock.now * threads._TICKS * top

    def own_cpu():
        return clock.now * (top - others)
    return {"cpu_times": cpu_times, "own_cpu": own_cpu}


@needs_two
def test_the_tuner_tries_fewer_threads_only_when_others_use_the_cores(restore_threads):
    """A probe on cores nobody else uses keeps all of them without trying fewer (each batch on
    fewer threads is a loss there); with a core used by another process it tries every count
    and picks the fastest."""
    threads.set_num_threads("auto")
    top = threads.max_threads()
    for others, want in ((0, {top}), (1, set(threads.candidate_counts(top)))):
        clock = FakeClock()
        with threads.Tuner(reprobe_s=30.0, clock=clock, **machine(clock, top, others)) as tuner:
            used = run_batches(tuner, clock, lambda n: 1.0 if n == 1 else 1.2, 200)
        assert set(used) == want, others  # (200 batches: several re-probes, 30 s apart)
        if others:
            assert used[-5:] == [1] * 5


@needs_two
def test_the_tuner_goes_back_to_all_cores_when_the_others_leave(restore_threads):
    threads.set_num_threads("auto")
    top = threads.max_threads()
    clock = FakeClock()
    others = [1]
    fake = machine(clock, top, 1)
    spent = {"at": 0.0, "cpu": 0.0}

    def own_cpu():  # this process's CPU time grows by (top - others) cores a second
        spent["cpu"] += (clock.now - spent["at"]) * (top - others[0])
        spent["at"] = clock.now
        return spent["cpu"]

    def cost(n):
        return 1.0 if others[0] and n == 1 else 3.0 / n

    with threads.Tuner(reprobe_s=50.0, clock=clock, cpu_times=fake["cpu_times"],
                       own_cpu=own_cpu) as tuner:
        assert run_batches(tuner, clock, cost, 40)[-5:] == [1] * 5
        others[0] = 0
        used = run_batches(tuner, clock, cost, 200)
        assert used[-5:] == [top] * 5


def test_a_fixed_count_is_never_tuned(restore_threads):
    fastcnn.set_num_threads(1)
    clock = FakeClock()
    with threads.Tuner(clock=clock, cpu_times=busy_cores) as tuner:
        assert not tuner.active
        assert run_batches(tuner, clock, lambda n: 1.0 if n > 1 else 5.0, 30) == [1] * 30
        assert tuner.most_used() == 1
    assert threads.get_num_threads() == 1
    assert not threads.tuned()
    threads.set_num_threads("auto")
    assert threads.tuned() and threads.get_num_threads() == threads.max_threads()
    with pytest.raises(TypeError, match="int or 'auto'"):
        threads.set_num_threads("all")


def test_fit_records_its_thread_count_per_epoch_and_restores_all_cores(restore_threads, rng):
    import numpy as np

    from fastcnn import models

    threads.set_num_threads("auto")
    x = rng.integers(0, 255, (60, 1, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 60)
    history = models.build("simple", seed=0).fit(x, y, epochs=2, batch_size=5, seed=0)
    assert len(history["threads"]) == 2
    assert all(1 <= n <= threads.max_threads() for n in history["threads"])
    assert threads.get_num_threads() == threads.max_threads()
    fastcnn.set_num_threads(1)
    history = models.build("simple", seed=0).fit(x, y, epochs=1, batch_size=5, seed=0)
    assert history["threads"] == [1]


@pytest.mark.parametrize("batch", [2, 16])
def test_the_modern_model_trains_the_same_on_one_thread_and_all(restore_threads, rng, batch):
    """BatchNorm, Dropout and Adam too: the tuner may switch counts mid-run."""
    import numpy as np

    from fastcnn import models

    x = rng.integers(0, 255, (32, 1, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 32)
    results = []
    for n in (1, threads.max_threads()):
        fastcnn.set_num_threads(n)
        with fastcnn.use_backend("numba"):
            net = models.build("modern", seed=0)
            net.fit(x, y, epochs=1, batch_size=batch, seed=0, optimizer=fastcnn.Adam(1e-3))
        results.append([a for _, a, _ in net.parameters()] + [b for _, b in net.buffers()])
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


@needs_two
def test_the_tuner_probes_again_when_a_core_goes_idle(restore_threads):
    """On one thread because another process held the cores: once /proc/stat shows an idle
    core, it tries all cores again without waiting for reprobe_s."""
    threads.set_num_threads("auto")
    top = threads.max_threads()
    clock = FakeClock()
    other = [True]  # another process keeps every other core busy
    seen = {"time": 0.0, "idle": 0.0}

    def cpu_times():  # idle and total jiffies, advancing with the fake clock
        if not other[0]:
            seen["idle"] += (clock.now - seen["time"]) * 100 * (top - 1)
        seen["time"] = clock.now
        return seen["idle"], clock.now * 100 * top

    def cost(n):
        return 10.0 if other[0] and n > 1 else 1.0 / n

    with threads.Tuner(reprobe_s=1e9, clock=clock, cpu_times=cpu_times) as tuner:
        assert run_batches(tuner, clock, cost, 40)[-5:] == [1] * 5
        assert run_batches(tuner, clock, cost, 20)[-5:] == [1] * 5  # still busy: stays
        other[0] = False
        assert run_batches(tuner, clock, cost, 40)[-5:] == [top] * 5


def test_only_the_numba_backend_tunes_its_threads(monkeypatch, rng, restore_threads):
    """OpenBLAS (the numpy backend) sums differently on different thread counts: tuning there
    would make two runs of one seed differ."""
    import numpy as np

    from fastcnn import models

    threads.set_num_threads("auto")
    made = []

    class Spy(threads.Tuner):
        def __init__(self, *args, **kwargs):
            made.append(kwargs.get("enabled", True))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(threads, "Tuner", Spy)
    x = rng.integers(0, 255, (20, 1, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 20)
    for name in ("numpy", "numba", "naive"):
        with fastcnn.use_backend(name):
            models.build("simple", seed=0).fit(x[:4] if name == "naive" else x,
                                               y[:4] if name == "naive" else y, batch_size=4,
                                               seed=0)
    assert made == [False, True, False]


def cgroup(tmp_path, monkeypatch, proc, files):
    """A fake /sys/fs/cgroup under tmp_path with ``files`` ({relative path: text}), and this
    process's /proc/self/cgroup as ``proc``."""
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(exist_ok=True)
    (tmp_path / "proc").write_text(proc)
    monkeypatch.setattr(threads, "CGROUP_ROOT", root)
    monkeypatch.setattr(threads, "PROC_CGROUP", tmp_path / "proc")


V2 = {"cgroup.controllers": "cpu memory"}


@pytest.mark.parametrize("proc, files, quota", [
    # cgroup v2, as docker --cpus=2 sets it inside the container (its cgroup is the root)
    ("0::/\n", {**V2, "cpu.max": "200000 100000\n"}, 2),
    ("0::/\n", {**V2, "cpu.max": "150000 100000\n"}, 2),  # 1.5 cores: two threads
    ("0::/\n", {**V2, "cpu.max": "50000 100000\n"}, 1),
    ("0::/\n", {**V2, "cpu.max": "max 100000\n"}, None),  # no limit
    # a nested cgroup: the tightest limit on the way to the root counts
    ("0::/kubepods/pod1\n", {**V2, "kubepods/cpu.max": "100000 100000",
                              "kubepods/pod1/cpu.max": "400000 100000"}, 1),
    # the path of another namespace: the container's root is read
    ("0::/elsewhere/x\n", {**V2, "cpu.max": "300000 100000"}, 3),
    # cgroup v1
    ("4:cpu,cpuacct:/docker/abc\n", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000",
                                     "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"}, 3),
    ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    # nothing to read, or nonsense: no quota
    ("0::/\n", {}, None),
    ("0::/\n", {**V2, "cpu.max": "lots 100000"}, None),
])
def test_the_cpu_quota_of_a_container_is_read(tmp_path, monkeypatch, proc, files, quota):
    cgroup(tmp_path, monkeypatch, proc, files)
    assert threads.cpu_quota() == quota


def test_threads_start_from_the_cores_a_container_allows(tmp_path, monkeypatch, restore_threads):
    """In a container limited to one core on a host of more, the pool and the tuner start from
    one thread, not one per visible core; set_num_threads can still ask for more."""
    cgroup(tmp_path, monkeypatch, "0::/\n", {**V2, "cpu.max": "100000 100000"})
    assert threads.available_cores() == 1 and threads.default_threads() == 1
    assert threads.Tuner(enabled=True).candidates == [1]
    monkeypatch.setattr(threads, "_defaulted", [])
    threads.apply_default_once()
    assert threads.get_num_threads() == 1
    threads.set_num_threads("auto")
    assert threads.get_num_threads() == 1
    if threads.max_threads() > 1:
        threads.set_num_threads(2)
        assert threads.get_num_threads() == 2


def test_the_tuner_tries_more_counts_than_halving_on_many_cores():
    assert threads.candidate_counts(64) == [64, 48, 32, 16, 8, 4, 2, 1]
    assert threads.candidate_counts(16) == [16, 12, 8, 4, 2, 1]
    assert threads.candidate_counts(2) == [2, 1] and threads.candidate_counts(1) == [1]
    assert threads.Tuner(maximum=12, enabled=False).candidates == [12, 9, 6, 3, 1]


@needs_two
def test_a_choice_survives_short_loops_of_the_same_model_and_batch(restore_threads,
                                                                  monkeypatch):
    """Short fit calls of one model and batch share one Tuner: they do not each pay a probe
    from all cores down, a probe under way goes on in the next call, and a choice still ages
    (re-probed after reprobe_s of clock, counted across calls)."""
    monkeypatch.setattr(threads, "_tuners", {})
    threads.set_num_threads("auto")
    top = threads.default_threads()
    clock = FakeClock()
    cost = {"now": lambda n: 1.0 if n == 1 else 3.0}

    def short_loop(key, batches=4):
        tuner = threads.tuner_for(key, reprobe_s=30, clock=clock, cpu_times=busy_cores)
        with tuner:
            return tuner, run_batches(tuner, clock, lambda n: cost["now"](n), batches)

    loops = [short_loop("model, batch 10") for _ in range(5)]  # the probe spans the loops
    tuner = loops[-1][0]
    assert all(t is tuner for t, _ in loops) and tuner.chosen == 1
    assert loops[-1][1] == [1] * 4
    other, used = short_loop("another model", 2)  # its own tuner, probing from all cores
    assert other is not tuner and used == [top, top]
    cost["now"] = lambda n: 1.0 if n == 1 else 0.2  # all cores became the faster
    for _ in range(12):
        _, used = short_loop("model, batch 10")
    assert used == [top] * 4  # past 30 s of clock it probed again, across loops, and moved
    threads.set_num_threads(1)
    assert not threads.tuner_for("model, batch 10").active  # a fixed count: no tuning
