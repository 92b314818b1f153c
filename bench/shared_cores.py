"""Two trainings at once: how much of its speed each keeps when another one shares the cores.

    python bench/shared_cores.py                                   # complex, batch 64, numba
    python bench/shared_cores.py --engine torch
    NUMBA_THREADING_LAYER=workqueue python bench/shared_cores.py   # another thread runtime
    OMP_WAIT_POLICY=passive python bench/shared_cores.py

Each training is a process of its own (``fastcnn.bench_worker``) using every core (its default);
first one trains alone for --seconds, then two train at the same time for --seconds, --rounds
times. The report is each concurrent training's speed as a share of the speed alone: two
processes that shared the cores perfectly would each keep 50%. fastcnn tunes its thread count as
it trains (``fastcnn.threads.Tuner``), as ``ConvNet.fit`` does, unless --threads fixes it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import threading

from fastcnn import spawn


def start(engine, model, batch, threads):
    args = [engine, model, str(batch)] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(spawn.python_module("fastcnn.bench_worker", *args),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=spawn.environment())
    json.loads(proc.stdout.readline())  # ready (compiled, warm)
    return proc


def rate(proc, batches):
    proc.stdin.write(f"train {batches}\n")
    proc.stdin.flush()
    r = json.loads(proc.stdout.readline())
    return r["images"] / r["seconds"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default="numba", help="a fastcnn backend, or torch")
    p.add_argument("--model", default="complex")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, help="threads per training (default: all cores)")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    procs = [start(args.engine, args.model, args.batch, args.threads) for _ in range(2)]
    probe = rate(procs[0], 3)
    batches = max(2, round(args.seconds * probe / args.batch))
    alones, togethers = [], []
    for r in range(args.rounds):
        alone = [rate(proc, batches) for proc in procs]
        together = [0.0, 0.0]

        def run(i, out=together):
            out[i] = rate(procs[i], batches)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        alones.append(alone)
        togethers.append(together)
        print(f"round {r + 1}: alone {alone[0]:,.0f} and {alone[1]:,.0f} img/s; together "
              f"{together[0]:,.0f} and {together[1]:,.0f} img/s", flush=True)
    # The speed alone is each training's best alone: fastcnn's thread tuner may still run on
    # the one thread it chose while the other training ran, until its next probe.
    best = [max(a[i] for a in alones) for i in range(2)]
    shares = [min(t[i] / best[i] for i in range(2)) for t in togethers]
    print("the slower kept " + ", ".join(f"{s:.0%}" for s in shares) + " of its best speed alone "
          f"({best[0]:,.0f} and {best[1]:,.0f} img/s) in the rounds")
    for proc in procs:
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        proc.wait()
    print(f"{args.engine} {args.model} batch {args.batch}: the slower of two concurrent "
          f"trainings kept {statistics.median(shares):.0%} of its speed alone (median of "
          f"{args.rounds} rounds; perfect sharing: 50%)")


if __name__ == "__main__":
    main()
