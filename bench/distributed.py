"""Data-parallel training against one process: K ranks x (cores / K) threads under mpirun against
one process on all cores, same model, same global batch, alternating runs.

    python bench/distributed.py                              # complex model, global batch 64
    python bench/distributed.py --batch 128 --ranks 2

Each run is a fresh `mpirun -n K` (or a plain process) that trains one warm-up pass on a few
batches (compiling), then --images images (one epoch), and reports images/s and, for the ranks,
the share of the time rank 0 spent in the gradients' allreduce. Needs the mpi extra.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time


def worker(args):
    import numpy as np

    import fastcnn
    from fastcnn import datasets, distributed, models

    dp = distributed.DataParallel() if distributed.launched_size() > 1 else None
    if dp is not None:
        fastcnn.set_num_threads(dp.threads())
    per_rank = args.batch // (dp.size if dp else 1)
    (x, y), _ = datasets.load("mnist-sample", raw=True)
    x, y = np.ascontiguousarray(x[: args.images]), y[: args.images]
    net = models.build(args.model, seed=0)
    net.fit(x[: 4 * args.batch], y[: 4 * args.batch], epochs=1, batch_size=per_rank, seed=0,
            distributed=dp, verbose=False)  # compile and warm up
    if dp is not None:
        dp.comm.Barrier()
        dp.allreduce_seconds = 0.0
    start = time.perf_counter()
    net.fit(x, y, epochs=1, batch_size=per_rank, seed=1, distributed=dp, verbose=False)
    seconds = time.perf_counter() - start
    if dp is None or dp.is_root:
        print(json.dumps({
            "images_per_second": len(x) / seconds,
            "allreduce_share": dp.allreduce_seconds / seconds if dp else 0.0,
            "ranks": dp.size if dp else 1, "threads": fastcnn.get_num_threads(),
            "batch_per_rank": per_rank}), flush=True)


def run(cmd):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="complex")
    p.add_argument("--batch", type=int, default=64, help="global batch (default: %(default)s)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--images", type=int, default=2560)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.batch % args.ranks:
        raise SystemExit("--batch must be a multiple of --ranks")
    mpirun = shutil.which("mpirun", path=f"{os.path.dirname(sys.executable)}{os.pathsep}"
                                         f"{os.environ.get('PATH', '')}")
    if mpirun is None:
        raise SystemExit('mpirun not found: pip install -e ".[mpi]"')
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--model", args.model,
          "--batch", str(args.batch), "--images", str(args.images)]
    single, ranks = [], []
    for r in range(args.rounds):
        single.append(run(me))
        ranks.append(run([mpirun, "-n", str(args.ranks), "--oversubscribe", *me]))
        print(f"round {r + 1}: 1 process x {single[-1]['threads']} threads "
              f"{single[-1]['images_per_second']:,.0f} img/s; {args.ranks} ranks x "
              f"{ranks[-1]['threads']} threads {ranks[-1]['images_per_second']:,.0f} img/s "
              f"(allreduce {ranks[-1]['allreduce_share']:.1%} of rank 0's time)", flush=True)
    a = statistics.median(s["images_per_second"] for s in single)
    b = statistics.median(s["images_per_second"] for s in ranks)
    share = statistics.median(s["allreduce_share"] for s in ranks)
    print(f"{args.model}, global batch {args.batch}: {args.ranks} ranks {b:,.0f} img/s against one "
          f"process {a:,.0f} img/s ({b / a:.2f}x); allreduce {share:.1%} of a rank's time "
          f"(medians of {args.rounds})")


if __name__ == "__main__":
    main()
