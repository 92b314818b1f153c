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
    from fastcnn import backend, cli, datasets, models

    assert cli.BACKENDS == tuple(backend.BACKENDS)
    assert cli.DATASETS == datasets.NAMES
    assert cli.MODELS == models.MODELS


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

    monkeypatch.setattr(memory, "retain_freed_memory", interrupt)
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
