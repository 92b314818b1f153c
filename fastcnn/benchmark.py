"""``fastcnn bench``: end-to-end training and inference speed of each backend, and of PyTorch CPU
on the same architecture, batch, thread count and data, measured in one interleaved run.

For each (model, batch size) every engine gets a process of its own (see ``bench_worker``); then,
round after round, each engine in turn trains for about ``seconds`` and infers for as long. Speeds
are the median over rounds; the ratio against PyTorch is taken within each round, then the median,
so that the machine's drift (these machines are shared) cancels out.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
from dataclasses import asdict, dataclass, field

from . import atomic, jit_cost, spawn
from .bench_worker import TORCH

EPOCH_IMAGES = 60_000  # one epoch of MNIST / Fashion-MNIST


def torch_available():
    return importlib.util.find_spec("torch") is not None


class Worker:
    """A bench_worker process, spoken to line by line."""

    def __init__(self, engine, model, batch_size, threads):
        cmd = spawn.python_module("fastcnn.bench_worker", engine, model, str(batch_size))
        if threads:
            cmd += ["--threads", str(threads)]
        if engine == "naive":
            cmd.append("--no-warmup")  # nothing to compile, and one batch takes minutes
        self.engine = engine
        self.threads_seen = {}  # (train|infer, thread count) -> times reported
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=spawn.environment())
        self.ready = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read().strip().splitlines()
            self.end()
            raise RuntimeError(f"the {self.engine} benchmark worker died: "
                               f"{err[-1] if err else 'no output'}")
        return json.loads(line)

    def ask(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def rate(self, what, batches):
        r = self.ask(f"{what} {batches}")
        if r.get("threads"):  # fastcnn: the count its thread tuner used most
            key = (what, r["threads"])
            self.threads_seen[key] = self.threads_seen.get(key, 0) + 1
        return r["images"] / r["seconds"]

    def threads_used(self, what):
        """The thread count fastcnn used in most ``what`` rounds (None for PyTorch)."""
        seen = {n: k for (w, n), k in self.threads_seen.items() if w == what}
        return max(seen, key=seen.get) if seen else None

    def close(self):
        """Ask for the peak memory, then end the process."""
        stats = self.ask("stats")
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)
        self.end()
        return stats

    def end(self):
        """Kill the process if it still runs, reap it and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            pipe.close()


@dataclass
class EngineResult:
    engine: str
    train_ips: float
    infer_ips: float
    peak_rss_mb: float
    rounds: int
    batches_per_round: int
    first_batch_s: float | None = None
    train_vs_torch: float | None = None
    infer_vs_torch: float | None = None
    train_threads: int | None = None  # fastcnn's tuned count, most rounds (None: torch)
    infer_threads: int | None = None

    @property
    def epoch_s(self):
        return EPOCH_IMAGES / self.train_ips


@dataclass
class ConfigResult:
    model: str
    batch_size: int
    threads: int
    engines: list = field(default_factory=list)
    compile: dict | None = None  # numba cold / cached start, from jit_cost


def _batches_for(worker, seconds, batch_size):
    """How many batches take about ``seconds`` for this engine (at least 1)."""
    if worker.engine == "naive":
        return 1
    probe = 2 if batch_size >= 64 else 5
    ips = worker.rate("train", probe)
    return max(1, round(seconds * ips / batch_size))


def run_config(model, batch_size, engines, threads, rounds, seconds, progress=print):
    """Measure every engine on one (model, batch size), interleaved; returns a ConfigResult."""
    workers = []
    try:
        for engine in engines:
            progress(f"  starting {engine} ...")
            workers.append(Worker(engine, model, batch_size, threads))
        counts = {w.engine: _batches_for(w, seconds, batch_size) for w in workers}
        train = {w.engine: [] for w in workers}
        infer = {w.engine: [] for w in workers}
        for r in range(rounds):
            order = workers[r % len(workers):] + workers[: r % len(workers)]
            for w in order:
                if w.engine == "naive" and r > 0:
                    continue  # one round of one batch is all the loops can afford
                train[w.engine].append(w.rate("train", counts[w.engine]))
                infer[w.engine].append(w.rate("infer", counts[w.engine]))
            progress(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{e} {train[e][-1]:,.0f} img/s" for e in train if len(train[e]) == r + 1))
        stats = {w.engine: w.close() for w in workers}
    finally:
        for w in workers:
            w.end()
    result = ConfigResult(model, batch_size, threads or os.cpu_count())
    for w in workers:
        e = w.engine
        res = EngineResult(e, statistics.median(train[e]), statistics.median(infer[e]),
                           stats[e]["peak_rss_mb"], len(train[e]), counts[e],
                           w.ready.get("first_batch_s"), train_threads=w.threads_used("train"),
                           infer_threads=w.threads_used("infer"))
        if TORCH in train and e != TORCH:
            n = len(train[e])  # the rounds this engine ran; torch ran in each of them
            res.train_vs_torch = statistics.median(
                a / b for a, b in zip(train[e], train[TORCH][:n], strict=True))
            res.infer_vs_torch = statistics.median(
                a / b for a, b in zip(infer[e], infer[TORCH][:n], strict=True))
        result.engines.append(res)
    return result


def _duration(seconds):
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.0f} days"


def _ratio(r):
    return "-" if r is None else f"{r:.2f}x" if r >= 0.1 else f"1/{1 / r:,.0f}"


def format_table(result):
    tuned = " at most" if any(e.train_threads for e in result.engines) else ""
    head = (f"model {result.model}, batch {result.batch_size},{tuned} {result.threads} threads, "
            f"float32, mnist-sample")
    rows = [("engine", "train img/s", "infer img/s", "epoch (60k)", "30 epochs", "peak RSS",
             "train vs torch", "infer vs torch", "threads train/infer")]
    for e in result.engines:
        rows.append((
            e.engine if e.engine == TORCH else f"fastcnn {e.engine}",
            f"{e.train_ips:,.0f}" if e.train_ips >= 10 else f"{e.train_ips:.2f}",
            f"{e.infer_ips:,.0f}" if e.infer_ips >= 10 else f"{e.infer_ips:.2f}",
            _duration(e.epoch_s), _duration(30 * e.epoch_s), f"{e.peak_rss_mb:,.0f} MB",
            _ratio(e.train_vs_torch),
            _ratio(e.infer_vs_torch),
            f"{e.train_threads}/{e.infer_threads}" if e.train_threads else str(result.threads),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head]
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                         strict=True)]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("-" * len(lines[-1]))
    if tuned:
        lines.append("fastcnn's thread count is tuned as it trains (all cores, or fewer while "
                     "faster), as in ConvNet.fit; --threads fixes it")
    rounds = {e.engine: e.rounds for e in result.engines}
    lines.append("rounds: " + ", ".join(f"{k} {v}" for k, v in rounds.items()))
    if result.compile:
        cold = result.compile["cold"]["to_first_batch_s"]
        cached = result.compile["cached"]["to_first_batch_s"]
        lines.append(f"numba, start to the end of the first batch: cold {cold:.1f} s "
                     f"(compiling), cached {cached:.2f} s")
    return "\n".join(lines)


def to_json(results, meta):
    out = {"meta": meta, "results": []}
    for r in results:
        d = asdict(r)
        for e, src in zip(d["engines"], r.engines, strict=True):
            e["epoch_s"] = src.epoch_s
        out["results"].append(d)
    return out


def from_json(data, source="the results"):
    """(meta, [ConfigResult]) back from what ``to_json`` wrote; a ValueError naming ``source``
    if it is not that."""
    try:
        results = []
        for r in data["results"]:
            result = ConfigResult(r["model"], int(r["batch_size"]), int(r["threads"]),
                                  compile=r.get("compile"))
            for e in r["engines"]:
                fields = {k: v for k, v in e.items() if k in EngineResult.__dataclass_fields__}
                result.engines.append(EngineResult(**fields))
            results.append(result)
        return dict(data.get("meta", {})), results
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source} is not a 'fastcnn bench --json' file ({e!r})") from None


def plot(results, path):
    """The chart of ``fastcnn bench --plot``: for each (model, batch), each fastcnn backend's
    training speed as a multiple of PyTorch's (linear scale, PyTorch = 1 as a line), labelled with
    the ratio and the images/s behind it. Without PyTorch, relative to the first backend."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install -e \".[plot]\"") from e
    engines = [e for e in dict.fromkeys(x.engine for r in results for x in r.engines)
               if e != TORCH]
    has_torch = all(TORCH in {e.engine for e in r.engines} for r in results)
    base_name = TORCH if has_torch else engines[0]
    width = 0.8 / max(len(engines), 1)
    fig = Figure(figsize=(4.2 + 2.3 * len(results), 4.6), dpi=120, layout="constrained")
    ax = fig.subplots()
    colors = {"naive": "#b0b0b0", "numpy": "#4c72b0", "numba": "#dd8452"}

    def ratio_of(r, e):  # the table's ratio (median of per-round ratios) where there is one
        if has_torch and e.train_vs_torch is not None:
            return e.train_vs_torch
        return e.train_ips / next(x for x in r.engines if x.engine == base_name).train_ips

    top = max([1.0] + [ratio_of(r, e) for r in results for e in r.engines
                       if e.engine != TORCH])
    ymax = top * 1.25
    label_h = 0.11 * ymax  # two lines of 8-pt text, in data units (the axes are ~4 in tall)
    for g, r in enumerate(results):
        by = {e.engine: e for e in r.engines}
        for k, name in enumerate(engines):
            if name not in by:
                continue
            x = g - 0.4 + width * (k + 0.5)
            ips = by[name].train_ips
            ratio = ratio_of(r, by[name])
            ax.bar(x, ratio, width * 0.85, color=colors.get(name, "#55a868"),
                   label=f"fastcnn {name}" if g == 0 else None, zorder=2)
            text = f"{_ratio(ratio)}\n" + (f"{ips:,.0f}/s" if ips >= 10 else f"{ips:.2f}/s")
            # above the bar, unless the PyTorch line would run through the label: then inside
            inside = ratio < 1.0 < ratio + label_h and ratio > label_h
            ax.annotate(text, (x, ratio), xytext=(0, -3 if inside else 3),
                        textcoords="offset points", ha="center",
                        va="top" if inside else "bottom", fontsize=8,
                        color="white" if inside else "black", zorder=4)
        base = by[base_name].train_ips
        ax.annotate(f"{'PyTorch' if has_torch else base_name} {base:,.0f} img/s",
                    (g, 0), xytext=(0, -30), textcoords="offset points", ha="center",
                    va="top", fontsize=8, color="0.3", annotation_clip=False)
    ax.axhline(1.0, color="black", linewidth=1.2, zorder=1,
               label="PyTorch CPU = 1" if has_torch else f"{base_name} = 1")
    ax.set_xticks(range(len(results)), [f"{r.model}, batch {r.batch_size}" for r in results])
    ax.set_xlim(-0.5, len(results) - 0.5)
    ax.set_ylim(0, ymax)
    ax.set_ylabel("training speed, x " + ("PyTorch's" if has_torch else f"{base_name}'s"))
    ax.grid(axis="y", alpha=0.3, zorder=0)
    threads = results[0].threads
    ax.set_title(f"fastcnn training speed against {'PyTorch CPU' if has_torch else base_name}\n"
                 f"float32, up to {threads} threads; higher is faster", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside: over no bar
    atomic.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def run(models, batch_sizes, backends, threads=None, rounds=3, seconds=2.0, use_torch=True,
        compile_time=True, progress=print):
    """Every (model, batch) configuration in turn; returns a list of ConfigResult."""
    engines = list(backends)
    if use_torch:
        if torch_available():
            engines.append(TORCH)
        else:
            progress("PyTorch is not installed: measuring fastcnn alone "
                     "(pip install torch==2.13.0 adds the comparison).")
    results = []
    for model in models:
        for batch in batch_sizes:
            progress(f"{model} model, batch {batch}:")
            result = run_config(model, batch, engines, threads, rounds, seconds, progress)
            if compile_time and "numba" in backends:
                progress("  timing numba's compile (cold and cached starts) ...")
                result.compile = jit_cost.cold_and_cached(model, batch)
            results.append(result)
    return results
