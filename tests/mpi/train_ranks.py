"""Run under `mpirun -n K`: train with fit(distributed=True) in several configurations and write
every rank's final parameters to OUT/<case>.rank<r>.npz (tests/test_distributed.py compares them
with one process training on batch K x b).

    mpirun -n 2 python tests/mpi/train_ranks.py OUT
    mpirun -n 2 python -m mpi4py tests/mpi/train_ranks.py OUT --fail-on-rank 1
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ for distributed_cases

from distributed_cases import CASES, data, make  # noqa: E402

import fastcnn  # noqa: E402
from fastcnn import distributed  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--fail-on-rank", type=int, help="raise on this rank at the third step")
    args = p.parse_args()
    dp = distributed.DataParallel()
    fastcnn.set_num_threads(dp.threads())
    out = Path(args.out)
    for name, case in CASES.items():
        net, opt = make(case)
        x, y = data(case)
        if args.fail_on_rank is not None:
            take_step, steps = opt.step, [0]

            def step(net, take_step=take_step, steps=steps):  # a rank that fails mid-run
                steps[0] += 1
                if steps[0] == 3 and dp.rank == args.fail_on_rank:
                    raise RuntimeError(f"planted failure on rank {dp.rank}")
                take_step(net)
            opt.step = step
        history = net.fit(x, y, epochs=case["epochs"], batch_size=case["batch"], seed=3,
                          optimizer=opt, distributed=dp, verbose=False,
                          augment=case.get("augment"))
        arrays = {k: a for k, a, _ in net.parameters()}
        arrays["loss"] = np.asarray(history["loss"])
        arrays["batch_loss"] = np.asarray(history["batch_loss"])
        np.savez(out / f"{name}.rank{dp.rank}.npz", **arrays)
    if dp.rank == 0:
        print(f"ranks {dp.size}, threads {fastcnn.get_num_threads()}, cases {len(CASES)}")


if __name__ == "__main__":
    main()
