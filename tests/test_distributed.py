"""Data-parallel training under mpirun: K processes with batch b end with the weights of one
process with batch K x b; the CLI's --distributed; a failure on one rank ends the job.

These tests need mpi4py and an MPI launcher (pip install -e ".[mpi]"); without them they skip,
unless FASTCNN_REQUIRE_MPI=1 (CI sets it) makes that a failure."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from distributed_cases import CASES, data, make

from fastcnn import distributed

HERE = Path(__file__).resolve().parent
MPIRUN = shutil.which("mpirun", path=f"{Path(sys.executable).parent}{os.pathsep}"
                                      f"{os.environ.get('PATH', '')}")
HAVE_MPI = MPIRUN is not None and importlib.util.find_spec("mpi4py") is not None
if not HAVE_MPI and os.environ.get("FASTCNN_REQUIRE_MPI") == "1":
    raise RuntimeError("FASTCNN_REQUIRE_MPI=1 but mpi4py or mpirun is missing: pip install -e "
                       "'.[mpi]'")
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="mpi4py/mpirun not installed (the mpi extra)")


def mpirun(*args, ranks=2, cwd=None, timeout=300):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return subprocess.run([MPIRUN, "-n", str(ranks), "--oversubscribe", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def test_the_launchers_environment_says_how_many_processes(monkeypatch):
    for name in (*distributed.SIZE_VARIABLES, *distributed.RANK_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launched_size() == 1 and distributed.launched_rank() == 0
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setenv("PMI_RANK", "3")
    assert distributed.launched_size() == 4 and distributed.launched_rank() == 3
    with pytest.raises(TypeError, match="distributed must be"):
        distributed.resolve("yes")
    alone = distributed.resolve(False)
    assert isinstance(alone, distributed.SingleProcess) and distributed.resolve(alone) is alone


def test_one_process_is_a_job_of_one():
    """The trainer's one loop runs a SingleProcess where it would run a DataParallel: the shard
    is the whole batch, combined numbers come back as they were, bit for bit."""
    alone = distributed.SingleProcess()
    assert (alone.rank, alone.size, alone.is_root) == (0, 1, True)
    idx = np.arange(7)
    assert alone.shard(idx) is idx and alone.part(7) == slice(0, 7)
    loss = 0.1 + 0.2  # a sum that x * n / n would not give back for every n
    assert alone.combine([loss], 3, [5, True]) == ([loss], [5, True])
    assert alone.shared_seed(None) is None and alone.shared_seed(4) == 4


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_a_ranks_part_of_the_validation_set_is_its_shard_as_a_slice(size):
    parts = []
    for rank in range(size):
        dp = object.__new__(distributed.DataParallel)  # no MPI needed for the arithmetic
        dp.rank, dp.size = rank, size
        part = dp.part(11)
        np.testing.assert_array_equal(np.arange(11)[part], dp.shard(np.arange(11)))
        parts.append(part)
    assert parts[0].start == 0 and parts[-1].stop == 11


@pytest.fixture(scope="module")
def ranks_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    run = mpirun(sys.executable, str(HERE / "mpi" / "train_ranks.py"), str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ranks 2, threads" in run.stdout
    return out


@needs_mpi
@pytest.mark.parametrize("name", list(CASES))
def test_k_processes_end_with_the_weights_of_one_process_with_k_times_the_batch(ranks_output,
                                                                                name):
    case = CASES[name]
    got = [np.load(ranks_output / f"{name}.rank{r}.npz") for r in range(2)]
    for key in got[0].files:  # every rank holds the same model
        np.testing.assert_array_equal(got[0][key], got[1][key], err_msg=key)
    if not case.get("compare", True):
        return
    net, opt = make(case)
    x, y = data(case)
    history = net.fit(x, y, epochs=case["epochs"], batch_size=2 * case["batch"], seed=3,
                      optimizer=opt, verbose=False)
    tol = dict(rtol=1e-10, atol=1e-12) if case["dtype"] == "float64" else dict(rtol=2e-4,
                                                                               atol=2e-6)
    for key, a, _ in net.parameters():
        np.testing.assert_allclose(got[0][key], a, **tol, err_msg=key)
    np.testing.assert_allclose(got[0]["batch_loss"], history["batch_loss"], **tol)
    np.testing.assert_allclose(got[0]["loss"], history["loss"], **tol)


@needs_mpi
def test_mpirun_fastcnn_train_distributed_reports_one_test_accuracy(tmp_path):
    run = mpirun(sys.executable, "-m", "fastcnn.cli", "train", "--distributed", "--epochs", "1",
                 "--limit", "1000", "--test-limit", "300", "--save", "m.npz", "--checkpoint",
                 "c.npz", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert sum(line.startswith("test accuracy ") for line in lines) == 1
    assert sum(line.startswith("epoch 1/1: loss") for line in lines) == 1
    assert "distributed: 2 processes x 1 threads, global batch 2 x 10 = 20" in run.stdout
    config = json.loads((tmp_path / "m.history.json").read_text())["config"]
    assert config["processes"] == 2
    # the model is the one the test accuracy was measured on
    check = subprocess.run([sys.executable, "-m", "fastcnn.cli", "evaluate", "m.npz"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    # its checkpoint resumes under as many processes, and only so (a batch there is 2 x 10)
    alone = subprocess.run([sys.executable, "-m", "fastcnn.cli", "train", "--resume", "c.npz",
                            "--epochs", "2"], capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert alone.returncode == 1 and "written by a run of 2 processes" in alone.stderr
    again = mpirun(sys.executable, "-m", "fastcnn.cli", "train", "--distributed", "--resume",
                   "c.npz", "--epochs", "2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "epoch 2/2: loss" in again.stdout and again.stdout.count("test accuracy") == 1


@needs_mpi
def test_a_failure_on_one_rank_ends_the_whole_job_with_one_message(tmp_path):
    run = mpirun(sys.executable, str(HERE / "mpi" / "train_ranks.py"), str(tmp_path),
                 "--fail-on-rank", "1", timeout=120)  # a hang would time out
    assert run.returncode != 0
    assert run.stderr.count("fastcnn: error") == 1, run.stderr
    assert ("fastcnn: error on rank 1 of 2: RuntimeError: planted failure on rank 1 (ending all "
            "2 processes)") in run.stderr


@needs_mpi
def test_errors_every_rank_meets_are_told_once(tmp_path):
    run = mpirun(sys.executable, "-m", "fastcnn.cli", "train", "--distributed", "--epochs", "1",
                 "--limit", "500", "--lr", "1e6", cwd=tmp_path, timeout=120)
    assert run.returncode != 0
    assert run.stderr.count("fastcnn: error") == 1, run.stderr
    assert "training diverged" in run.stderr
    run = mpirun(sys.executable, "-m", "fastcnn.cli", "train", "--epochs", "1", "--limit", "100",
                 cwd=tmp_path, timeout=120)
    assert run.returncode != 0
    assert run.stderr.count("add --distributed") == 1, run.stderr


def mpirun_each(*per_rank, cwd=None, timeout=120):
    """mpirun of one process per argument list (MPMD: rank i runs ``per_rank[i]``)."""
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    command = [MPIRUN, "--oversubscribe"]
    for i, args in enumerate(per_rank):
        command += ([":"] if i else []) + ["-n", "1", sys.executable, "-m", "fastcnn.cli",
                                           "train", "--distributed", "--epochs", "1", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env)


@needs_mpi
@pytest.mark.parametrize("rank0, rank1, message", [
    # these trained apart and both exited 0
    (["--seed", "0"], ["--seed", "1"], "seed: 0 on rank 0, 1 on rank 1"),
    (["--optimizer", "sgd"], ["--optimizer", "adam", "--lr", "0.05"],
     "optimizer: SGD(lr=0.05, momentum=0.0, nesterov=False, weight_decay=0.0) on rank 0, "
     "Adam(lr=0.05"),
    # this aborted inside MPI_Allreduce with a C backtrace
    (["--model", "simple"], ["--model", "complex"], "model: 5 layers, 15,770 parameters on rank "
                                                    "0, 14 layers, 467,818 parameters on rank 1"),
    # this left rank 0 waiting forever
    (["--epochs", "1"], ["--epochs", "2"], "epochs: 1 on rank 0, 2 on rank 1"),
    # these ended with MPI_ERR_TRUNCATE
    (["--limit", "300"], ["--limit", "400"], "data: 270 images of uint8 [1, 28, 28], labels' "
                                             "CRC-32"),
    (["--batch-size", "10"], ["--batch-size", "20"], "batch_size: 10 on rank 0, 20 on rank 1"),
])
def test_ranks_started_with_other_settings_end_the_job_saying_what_differs(tmp_path, rank0,
                                                                           rank1, message):
    common = ["--limit", "300"] if "--limit" not in rank0 else []
    run = mpirun_each([*common, *rank0], [*common, *rank1], cwd=tmp_path)
    assert run.returncode != 0
    assert run.stderr.count("fastcnn: error") == 1, run.stderr
    assert "the 2 processes of this job were not started alike" in run.stderr, run.stderr
    assert message in run.stderr, run.stderr
    assert "epoch 1/" not in run.stdout  # before any training
