"""The fastcnn command, run as a user runs it: a subprocess."""

import subprocess
import sys

import pytest


def fastcnn(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastcnn.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_train_then_evaluate(tmp_path):
    model = tmp_path / "m.npz"
    run = fastcnn("train", "--epochs", "1", "--limit", "500", "--save", str(model))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert "450 training, 50 validation, 2000 test images" in lines[0]
    assert lines[1].startswith("epoch 1/1: loss") and "val acc" in lines[1]
    assert lines[-1].startswith("test accuracy ")
    accuracy = lines[-1].split()[2]
    assert model.is_file()

    run = fastcnn("evaluate", str(model))
    assert run.returncode == 0, run.stderr
    assert f"accuracy {accuracy}" in run.stdout  # the same model gives the same accuracy


def test_info_lists_backends():
    run = fastcnn("info")
    assert run.returncode == 0, run.stderr
    assert "backends" in run.stdout and "numpy" in run.stdout and "CPU" in run.stdout


@pytest.mark.parametrize("args,message", [
    (["evaluate", "no-such-model.npz"], "no model file at no-such-model.npz"),
    (["train", "--dataset", "mnist", "--data-dir", "{tmp}"], "could not get the mnist dataset"),
])
def test_errors_are_one_clear_line_and_a_nonzero_exit(tmp_path, monkeypatch, args, message):
    # No network here or in CI: make sure no mirror can answer even where one could.
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    run = fastcnn(*[a.format(tmp=tmp_path) for a in args], cwd=tmp_path)
    assert run.returncode == 1
    assert run.stderr.startswith("fastcnn: error: ") and message in run.stderr
    assert "Traceback" not in run.stderr


def test_bad_option_is_a_usage_error():
    run = fastcnn("train", "--epochs", "0")
    assert run.returncode == 2 and "must be >= 1" in run.stderr


def test_the_parsers_choices_agree_with_the_library():
    """Every flag with choices, in every command, offers exactly what the library defines (the
    parser keeps its own copies so that building it imports nothing heavy)."""
    from fastcnn import backend, cli, datasets, models, optim, predict

    library = {"backend": tuple(backend.BACKENDS), "dataset": datasets.NAMES,
               "model": models.MODELS, "recipe": tuple(models.RECIPES),
               "optimizer": tuple(optim.OPTIMIZERS),
               # a warm-up is --warmup N before any of the others, not a choice of its own
               "schedule": tuple(k for k in optim.SCHEDULES if not k.startswith("warmup")),
               "style": predict.STYLES, "dtype": ("float32", "float64"),
               "invert": ("auto", "yes", "no")}
    commands = next(a for a in cli._parser()._actions if a.dest == "command").choices
    seen = set()
    for name, parser in commands.items():
        for action in parser._actions:
            if action.choices is not None:
                assert action.dest in library, f"{name} --{action.dest}: no library list"
                assert tuple(action.choices) == tuple(library[action.dest]), (name, action.dest)
                seen.add(action.dest)
    assert seen == set(library)  # every list above is offered somewhere
    assert {"warmup", "warmup-then"} <= set(optim.SCHEDULES)


@pytest.mark.parametrize("args, message", [
    (["train", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["train", "--seed", "x"], "argument --seed: expected a whole number"),
    (["train", "--lr", "0"], "argument --lr: must be a positive finite number"),
    (["train", "--lr", "nan"], "argument --lr: must be a positive finite number"),
    (["train", "--val-fraction", "1"], "argument --val-fraction: must be in [0, 1)"),
    (["evaluate", "m.npz", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
])
def test_bad_values_name_their_flag(args, message):
    run = fastcnn(*args)
    assert run.returncode == 2 and message in run.stderr, run.stderr


@pytest.mark.parametrize("where, message", [("{tmp}/nowhere/m.npz", "nowhere does not exist"),
                                            ("{tmp}", "it is a folder")])
def test_a_bad_save_path_fails_before_training(tmp_path, where, message):
    run = fastcnn("train", "--epochs", "1", "--save", where.format(tmp=tmp_path))
    assert run.returncode == 1 and message in run.stderr
    assert run.stderr.startswith("fastcnn: error: cannot write the model to")
    assert "epoch" not in run.stdout  # nothing was trained
    assert "Traceback" not in run.stderr


def test_a_crafted_model_file_is_one_error_line(tmp_path):
    import numpy as np

    bad = tmp_path / "bad.npz"
    np.savez(bad, architecture=np.frombuffer(b"[]", np.uint8))
    run = fastcnn("evaluate", str(bad))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        f"fastcnn: error: {bad} is not a valid fastcnn model file: its architecture record is a "
        f"JSON list, not an object"]


def test_divergence_is_one_error_line():
    run = fastcnn("train", "--limit", "500", "--epochs", "1", "--lr", "1e6")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "fastcnn: error: training diverged" in run.stderr
    assert "smaller learning rate than lr=1e+06" in run.stderr
    assert "test accuracy" not in run.stdout


def test_the_command_imports_nothing_heavy_before_main():
    """So main's handler covers the imports too: a Ctrl-C there is one line, not a traceback."""
    code = "import sys, fastcnn.cli; print(sorted({'numpy', 'numba'} & set(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.strip() == "[]", run.stdout + run.stderr


def test_ctrl_c_anywhere_in_main_is_one_line(monkeypatch, capsys):
    from fastcnn import cli, memory

    def interrupt():
        raise KeyboardInterrupt

    monkeypatch.setattr(memory, "apply_once", interrupt)
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err == "fastcnn: interrupted\n"


@pytest.mark.parametrize("debug", ["", "1"])
def test_unexpected_errors_are_one_line_with_their_type(monkeypatch, capsys, debug):
    from fastcnn import cli

    def boom(args):
        raise MemoryError("no room")

    monkeypatch.setattr(cli, "cmd_info", boom)
    monkeypatch.setenv("FASTCNN_DEBUG", debug)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    if debug:
        assert "Traceback" in err and err.endswith("fastcnn: error: MemoryError: no room\n")
    else:
        assert err == "fastcnn: error: MemoryError: no room (set FASTCNN_DEBUG=1 for details)\n"


def test_bench_plot_without_matplotlib_fails_before_the_benchmark(monkeypatch, capsys, tmp_path):
    from fastcnn import benchmark, cli

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(benchmark, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
    assert cli.main(["bench", "--plot", str(tmp_path / "b.png")]) == 1
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_every_train_flag_has_help_and_the_readme_lists_it():
    from pathlib import Path

    from fastcnn import cli

    parser = cli._parser()
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for action in train._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings} has no help text"
        assert f"`{action.option_strings[0]}" in readme, f"README lacks {action.option_strings}"


def weights_of(path):
    import numpy as np

    with np.load(path) as z:
        return {k: z[k] for k in z.files if k != "architecture"}


def test_the_modern_recipe_trains_checkpoints_and_resumes_to_the_same_model(tmp_path):
    import numpy as np

    common = ["--recipe", "modern", "--limit", "400", "--schedule", "step", "--warmup", "0"]
    run = fastcnn("train", *common, "--epochs", "2", "--save", str(tmp_path / "whole.npz"))
    assert run.returncode == 0, run.stderr
    assert "model modern (468,202 parameters" in run.stdout and "AdamW(lr=0.002" in run.stdout
    run = fastcnn("train", *common, "--epochs", "1", "--checkpoint", str(tmp_path / "ck.npz"))
    assert run.returncode == 0, run.stderr
    run = fastcnn("train", "--resume", str(tmp_path / "ck.npz"), "--epochs", "2", "--save",
                  str(tmp_path / "resumed.npz"))
    assert run.returncode == 0, run.stderr
    assert "resuming after epoch 1" in run.stdout and "epoch 2/2" in run.stdout
    whole, resumed = weights_of(tmp_path / "whole.npz"), weights_of(tmp_path / "resumed.npz")
    assert whole.keys() == resumed.keys() and len(whole) > 20
    for key in whole:
        np.testing.assert_array_equal(whole[key], resumed[key], err_msg=key)
    bad = fastcnn("train", "--resume", str(tmp_path / "ck.npz"), "--lr", "0.1")
    assert bad.returncode == 1 and "leave out --lr" in bad.stderr


def test_ctrl_c_during_training_writes_a_checkpoint_and_says_where(tmp_path):
    import signal
    import time

    import numpy as np

    args = ["--recipe", "modern", "--limit", "1000", "--epochs", "6", "--schedule", "step",
            "--warmup", "0"]
    whole = fastcnn("train", *args, "--save", str(tmp_path / "whole.npz"))
    assert whole.returncode == 0, whole.stderr
    proc = subprocess.Popen([sys.executable, "-m", "fastcnn.cli", "train", *args,
                             "--checkpoint", str(tmp_path / "ck.npz")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("epoch 1/6") or not line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"wrote a checkpoint to {tmp_path / 'ck.npz'}" in err
    assert err.rstrip().endswith("fastcnn: interrupted") and "Traceback" not in err
    run = fastcnn("train", "--resume", str(tmp_path / "ck.npz"), "--save",
                  str(tmp_path / "resumed.npz"))
    assert run.returncode == 0, run.stderr
    a, b = weights_of(tmp_path / "whole.npz"), weights_of(tmp_path / "resumed.npz")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_the_first_run_says_it_is_compiling_and_a_cached_run_does_not(tmp_path):
    import os

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))  # a fresh install
    runs = [subprocess.run([sys.executable, "-m", "fastcnn.cli", "train", "--limit", "40",
                            "--test-limit", "20", "--epochs", "1"], capture_output=True,
                           text=True, timeout=300, env=env) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert "compiling the numba kernels" in runs[0].stderr
    assert "fastcnn: compiled in " in runs[0].stderr
    assert "compiling" not in runs[1].stderr  # loaded from the cache in well under a second
    assert "thread" in runs[1].stdout.splitlines()[1]  # the epoch line says the thread count
