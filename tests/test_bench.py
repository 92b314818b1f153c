"""fastcnn bench, its worker processes, and PyTorch as an oracle for the benchmarked models."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastcnn import benchmark
from fastcnn.bench_worker import TORCH


def test_bench_cli_table_json_and_chart(tmp_path):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    run = subprocess.run(
        [sys.executable, "-m", "fastcnn.cli", "bench", "--model", "simple", "--batch-size", "4",
         "--backend", "numpy", "numba", "--rounds", "2", "--seconds", "0.05", "--no-torch",
         "--no-compile-time", "--json", str(out), "--plot", str(png)],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "model simple, batch 4" in run.stdout and "fastcnn numba" in run.stdout
    data = json.loads(out.read_text())
    (result,) = data["results"]
    assert (result["model"], result["batch_size"]) == ("simple", 4)
    engines = {e["engine"]: e for e in result["engines"]}
    assert set(engines) == {"numpy", "numba"}
    for e in engines.values():
        assert e["train_ips"] > 0 and e["infer_ips"] > 0 and e["rounds"] == 2
        assert e["peak_rss_mb"] > 10  # a whole Python process with NumPy
        assert e["epoch_s"] == pytest.approx(60000 / e["train_ips"])
        assert e["train_vs_torch"] is None
        # the thread count its tuner used most, as fit would (1 .. all cores)
        assert 1 <= e["train_threads"] <= os.cpu_count()
        assert 1 <= e["infer_threads"] <= os.cpu_count()
    assert "threads train/infer" in run.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same results shown and drawn again without measuring anything
    again = tmp_path / "again.png"
    rerun = subprocess.run(
        [sys.executable, "-m", "fastcnn.cli", "bench", "--from-json", str(out), "--plot",
         str(again)], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.split("\n", 1)[1].count("fastcnn numba") == 1
    assert f"{engines['numba']['train_ips']:,.0f}" in rerun.stdout
    assert again.read_bytes() == png.read_bytes()
    (tmp_path / "bad.json").write_text('{"results": [{"model": "simple"}]}')
    bad = subprocess.run([sys.executable, "-m", "fastcnn.cli", "bench", "--from-json",
                          str(tmp_path / "bad.json")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "is not a 'fastcnn bench --json' file" in bad.stderr


def test_bench_without_torch_says_so_and_still_runs(monkeypatch):
    monkeypatch.setattr(benchmark, "torch_available", lambda: False)
    said = []
    results = benchmark.run(["simple"], [2], ["numpy"], rounds=1, seconds=0.01,
                            compile_time=False, progress=said.append)
    assert any("PyTorch is not installed" in s for s in said)
    assert [e.engine for e in results[0].engines] == ["numpy"]


def test_worker_death_is_a_clear_error():
    with pytest.raises(RuntimeError, match="numpy benchmark worker died.*batch size 9000"):
        benchmark.Worker("numpy", "simple", 9000, None)


def test_bench_rejects_bad_options():
    run = subprocess.run([sys.executable, "-m", "fastcnn.cli", "bench", "--seconds", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "argument --seconds: must be a positive" in run.stderr


@pytest.mark.parametrize("model", ["simple", "complex", "modern", "resnet"])
def test_torch_model_is_the_same_network_and_step(model, rng):
    """Oracle: with fastcnn's weights copied into the PyTorch model, one AdamW step on the same
    batch gives the same loss and the same new weights and running statistics -- the benchmarks
    compare like with like, and fastcnn's gradients agree with PyTorch's autograd. (Dropout is
    set to 0 in both: their masks come from different generators.)"""
    torch = pytest.importorskip("torch")
    from fastcnn import AdamW, Dropout
    from fastcnn.bench_worker import copy_weights, torch_model
    from fastcnn.models import build

    net = build(model, dtype=np.float64, seed=1)
    tnet = torch_model(model).double()
    for layer in net.layers:
        if isinstance(layer, Dropout):
            layer.p = 0.0
    for m in tnet.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    copy_weights(net, tnet)
    x = rng.random((3, 1, 28, 28))
    y = np.array([1, 7, 3])
    net.train()
    loss, _ = net.train_step(x, y, AdamW(0.01))
    opt = torch.optim.AdamW(tnet.parameters(), lr=0.01)
    tloss = torch.nn.functional.cross_entropy(tnet(torch.from_numpy(x)), torch.from_numpy(y))
    tloss.backward()
    opt.step()
    assert loss == pytest.approx(tloss.item(), rel=1e-10)
    theirs = dict(tnet.state_dict())
    ours = [a for _, a, _ in net.parameters()] + [b for _, b in net.buffers()]
    assert len(ours) == len([k for k in theirs if not k.endswith("num_batches_tracked")])
    # (a convolution's bias before BatchNorm has a zero gradient up to rounding, which AdamW
    # turns into steps of ~1e-9: hence the absolute tolerance)
    params = [p for p in tnet.parameters()]
    for a, b in zip([a for _, a, _ in net.parameters()], params, strict=True):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-8, atol=1e-8)
    stats = [v for k, v in theirs.items() if k.endswith(("running_mean", "running_var"))]
    for a, b in zip([b for _, b in net.buffers()], stats, strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-10, atol=1e-12)


def test_bench_with_torch_reports_ratios():
    pytest.importorskip("torch")
    results = benchmark.run(["simple"], [4], ["numba"], rounds=2, seconds=0.05,
                            compile_time=False, progress=lambda s: None)
    engines = {e.engine: e for e in results[0].engines}
    assert set(engines) == {"numba", TORCH}
    numba = engines["numba"]
    assert numba.train_vs_torch > 0 and numba.infer_vs_torch > 0
    assert engines[TORCH].train_vs_torch is None


def test_workers_import_the_parents_fastcnn_wherever_the_user_stands(tmp_path):
    """A folder holding another 'fastcnn' (a clone, say) must not reach the workers, which
    `python -m` / `python -c` would otherwise import first from the current folder."""
    impostor = tmp_path / "fastcnn"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("raise ImportError('the impostor was imported')\n")
    run = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.remove('') if '' in sys.path else None\n"
         "from fastcnn.cli import main; sys.exit(main())", "bench", "--backend", "numpy",
         "--rounds", "1", "--seconds", "0.05", "--no-torch", "--no-compile-time"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "numpy" in run.stdout and "impostor" not in run.stderr


def test_a_worker_that_finds_another_fastcnn_refuses_to_run(tmp_path):
    from fastcnn import spawn

    impostor = tmp_path / "fastcnn"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("")
    env = spawn.environment()
    env["_FASTCNN_PARENT_SYS_PATH"] = json.dumps([str(tmp_path)] + json.loads(
        env["_FASTCNN_PARENT_SYS_PATH"]))
    run = subprocess.run(spawn.python_code("print('ran')"), env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode != 0 and "ran" not in run.stdout
    assert "not the parent's" in run.stderr


def test_the_scaling_harness_prints_its_tables(tmp_path):
    """bench/scaling.py end to end at tiny settings: a row per thread count (one oversubscribed
    on purpose), the split of a step at 1 thread, and each pass's share of the FMA peak."""
    import re
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "scaling.py"
    from fastcnn import threads

    over = threads.available_cores() + 1
    run = subprocess.run([sys.executable, str(script), "--models", "simple", "--batches", "4",
                          "--threads", "1", str(over), "--rounds", "1", "--seconds", "0.05",
                          "--no-torch"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert re.search(r"FMA probe: [\d.]+ GFLOP/s on one core", out), out
    assert re.search(r"^1 \| [\d,]+ \(100%\)$", out, re.M), out
    assert re.search(rf"^{over} \(over\) \| [\d,]+ \(\d+%\)$", out, re.M), out
    shares = re.search(r"took [\d.]+ ms: ([\d.]+)% outside numba's parallel kernels, ([\d.]+)% "
                       r"laying out planes", out)
    assert shares and 0 < float(shares[1]) < 100 and 0 <= float(shares[2]) < 100, out
    rows = re.findall(r"^complex\.conv\d \| (forward|grad_weight|grad_input) \| \d+ \(\d+%\)",
                      out, re.M)
    assert len(rows) == 9, out


def test_fit_against_a_plain_torch_loop_prints_both_speeds():
    """bench/fit_vs_torch.py end to end at tiny settings (PyTorch is its opponent)."""
    import re
    from pathlib import Path

    pytest.importorskip("torch")
    script = Path(__file__).resolve().parent.parent / "bench" / "fit_vs_torch.py"
    run = subprocess.run([sys.executable, str(script), "--model", "simple", "--batch", "8",
                          "--images", "64", "--rounds", "2"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    line = re.search(r"^batch 8: fastcnn fit ([\d,]+), ([\d,]+) img/s; PyTorch loop ([\d,]+), "
                     r"([\d,]+); median ratio ([\d.]+)x$", run.stdout, re.M)
    assert line, run.stdout
    assert all(int(v.replace(",", "")) > 0 for v in line.groups()[:4]) and float(line[5]) > 0


def test_time_to_accuracy_script_runs_a_recipe(tmp_path):
    """bench/time_to_accuracy.py end to end on the ResNet recipe at tiny settings (digits of
    the sample, 2 epochs): both engines report each epoch, the table names every target."""
    import re
    from pathlib import Path

    pytest.importorskip("torch")
    script = Path(__file__).resolve().parent.parent / "bench" / "time_to_accuracy.py"
    out = tmp_path / "t.json"
    run = subprocess.run([sys.executable, str(script), "--recipe", "resnet", "--epochs", "2",
                          "--dataset", "mnist-sample", "--limit", "128", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for engine in ("fastcnn", "torch"):
        assert len(re.findall(rf"^epoch \d: {engine} +test accuracy [\d.]+% after", run.stdout,
                              re.M)) == 2, run.stdout
    record = json.loads(out.read_text())
    assert [row["target"] for row in record["table"]] == [0.92, 0.93, 0.935, 0.94]
    epochs = record["epochs"]
    assert all(0 <= e["accuracy"] <= 1 and e["seconds"] > 0 for v in epochs.values() for e in v)


def test_augment_cost_script_reports_both_cases():
    import re
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "augment_cost.py"
    run = subprocess.run([sys.executable, str(script), "--rounds", "1", "--images", "0.01"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = re.findall(r"^(\w+) [\dx]+ batch \d+ augment \S+: ([\d.]+) ms a step without, "
                      r"([\d.]+) ms with: [+-][\d.]+%$", run.stdout, re.M)
    assert [r[0] for r in rows] == ["simple", "resnet"], run.stdout
    assert all(float(a) > 0 and float(b) > 0 for _, a, b in rows)
