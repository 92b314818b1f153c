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
