"""Thread count for the compute: Numba's worker threads and the BLAS pool behind NumPy's matmul.

``set_num_threads(n)`` sets both, so that whichever backend runs, it uses n cores, and the two
runtimes don't fight over the same cores.

Unless a count was set that way, training chooses it as it goes (``Tuner``): on a shared machine
the fastest count is often not all cores. Every parallel kernel waits for its slowest thread, and
a thread whose core another process holds is descheduled for a time slice: two trainings of the
complex model at batch 64 started together on two cores, two threads each, kept 17-28% of their
speed alone; with one thread each, 55%. And even alone, a two-vCPU virtual machine can make small
parallel kernels lose: the simple model at batch 10 trained at 43k img/s on two threads and 71k on
one on the same machine within minutes (at other times, 83k on two).
"""

from __future__ import annotations

import ctypes
import math
import os
import statistics
import time
from pathlib import Path

# OpenBLAS builds name their setter differently (NumPy's wheels use a prefixed 64-bit build).
_BLAS_SETTERS = ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                 "openblas_set_num_threads64_", "scipy_openblas_set_num_threads")


def _blas_libraries():
    """ctypes handles of the OpenBLAS libraries loaded in this process (Linux; else none)."""
    import numpy  # noqa: F401  (loads NumPy's BLAS)

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return []
    libs = []
    for path in sorted(paths):
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            continue
    return libs


def _blas_functions(names):
    """For each loaded OpenBLAS, its first function called one of ``names``."""
    for lib in _blas_libraries():
        fn = next((getattr(lib, n) for n in names if hasattr(lib, n)), None)
        if fn is not None:
            yield fn


def max_threads() -> int:
    """The most threads Numba may use here (NUMBA_NUM_THREADS, by default the core count)."""
    import numba

    return numba.config.NUMBA_NUM_THREADS


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _read(path):
    try:
        return path.read_text().split()
    except (OSError, UnicodeDecodeError):
        return None


def _cgroup_dirs(version):
    """This process's cgroup folder for the CPU controller and those above it, innermost
    first (``version`` 2: the unified hierarchy; 1: the "cpu" controller's)."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if version == 2 and controllers == "":  # the unified hierarchy's own marker file
            roots = [r for r in (CGROUP_ROOT, CGROUP_ROOT / "unified")
                     if (r / "cgroup.controllers").is_file()]
        elif version == 1 and "cpu" in controllers.split(","):
            roots = [CGROUP_ROOT / controllers, CGROUP_ROOT / "cpu"]
        else:
            continue
        for root in roots:
            if root.is_dir():
                here = root / path.strip("/")
                if not here.is_dir():  # another namespace's path: the container's root
                    here = root
                return [here, *(p for p in here.parents if root in (p, *p.parents))]
    return []


def cpu_quota():
    """How many cores this process's cgroup lets it use, rounded up: the smallest CPU quota
    (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) on its way to the
    root, as ``docker --cpus`` or a Kubernetes limit sets it; None when there is none or it
    cannot be read."""
    quotas = []
    for folder in _cgroup_dirs(2):
        value = _read(folder / "cpu.max")
        if value and len(value) == 2 and value[0] != "max":
            quotas.append((value[0], value[1]))
    for folder in _cgroup_dirs(1):
        quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        if quota and period and quota[0] != "-1":
            quotas.append((quota[0], period[0]))
    cores = []
    for quota, period in quotas:
        try:
            q, p = int(quota), int(period)
        except ValueError:
            continue
        if q > 0 and p > 0:
            cores.append(max(1, math.ceil(q / p)))
    return min(cores, default=None)


def available_cores() -> int:
    """The cores this process may run on: its affinity mask (``taskset``, ``--cpuset-cpus``),
    and no more than its cgroup's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    return max(1, min(cores, quota) if quota else cores)


def default_threads() -> int:
    """The thread count when none is set: the cores this process may use (at most
    ``max_threads``)."""
    return min(max_threads(), available_cores())


_defaulted: list = []


def apply_default_once() -> None:
    """Start from ``default_threads``: in a container whose CPU quota is below the cores it
    sees, Numba's pool would otherwise run a thread per visible core (measured: 16 threads on
    2 cores kept 0.49-0.80 of the speed of 2). Called when the first kernel module loads."""
    if _defaulted:
        return
    _defaulted.append(True)
    if not _fixed and default_threads() < max_threads():
        _apply(default_threads())


_fixed: list = []  # [n] once set_num_threads(n) fixed the count; empty: training tunes it
_setters: list = []  # [the BLAS setter functions], found once


def _apply(n):
    import numba

    numba.set_num_threads(n)
    if not _setters:
        _setters.append(list(_blas_functions(_BLAS_SETTERS)))
    for setter in _setters[0]:
        setter(ctypes.c_int(n))


def set_num_threads(n) -> None:
    """Use n threads for the kernels: Numba's pool and, for the numpy backend, OpenBLAS's.

    A count set here is kept: training no longer tunes it (see ``Tuner``). ``"auto"`` goes back
    to all the cores this process may use (``default_threads``), tuned by training."""
    if n == "auto":
        _fixed.clear()
        _apply(default_threads())
        return
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"the thread count must be an int or 'auto', got {n!r}")
    if not 1 <= n <= max_threads():
        raise ValueError(f"the thread count must be between 1 and {max_threads()} "
                         f"(NUMBA_NUM_THREADS), got {n}")
    _fixed[:] = [n]
    _apply(n)


def tuned() -> bool:
    """Whether training chooses the thread count (no count was fixed with set_num_threads)."""
    return not _fixed


def get_num_threads() -> int:
    """Numba's thread count in this thread."""
    import numba

    return numba.get_num_threads()


def blas_num_threads():
    """OpenBLAS's thread count, or None when no OpenBLAS is loaded."""
    getters = tuple(s.replace("set_", "get_") for s in _BLAS_SETTERS)
    return next((int(get()) for get in _blas_functions(getters)), None)


def threading_layer() -> str:
    """The threading layer Numba runs its parallel kernels on (tbb, omp or workqueue)."""
    import numba
    import numpy as np

    from .kernels import numba_jit

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet: run a tiny one (the parallel
        a = np.zeros(1, np.float32)  # kernel itself: relu_forward would run its serial twin)
        numba_jit._relu_forward(a, a)
        return numba.threading_layer()


def _cpu_jiffies():
    """(idle, all) CPU time over all cores since boot, from /proc/stat; None if unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    return fields[3] + fields[4], sum(fields[:8])


def _own_cpu_seconds():
    """CPU seconds this process has used (all its threads, user and system)."""
    times = os.times()
    return times.user + times.system


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # /proc/stat's jiffy


def candidate_counts(top):
    """The counts a Tuner tries, most first: all, three quarters, half, a quarter, ... one
    (on 64 cores: 64, 48, 32, 16, 8, 4, 2, 1)."""
    counts = {top, max(1, round(top * 3 / 4))}
    n = top // 2
    while n >= 1:
        counts.add(n)
        n //= 2
    return sorted(counts, reverse=True)


_tuners: dict = {}  # key -> the Tuner of every loop over that key in this process


def tuner_for(key, enabled=True, **options):
    """The Tuner of a loop over ``key`` (say, a model and its batch shape): one per key in this
    process, so that its choice, its probe under way and the age of its choice carry over from
    one short ``fit`` call to the next instead of each probing from all cores down. A fresh
    one where tuning is off (not ``enabled``, or a count fixed by set_num_threads)."""
    tuner = _tuners.get(key)
    if not (enabled and tuned()):
        return Tuner(enabled=False, **options)
    if tuner is None or tuner.candidates != candidate_counts(default_threads()):
        tuner = _tuners[key] = Tuner(enabled=True, **options)
    return tuner


class Tuner:
    """Chooses, while a loop of batches runs, the thread count that runs them fastest now.

    It times a few batches on each candidate count (``candidate_counts``: all cores, three
    quarters, then halving down to one), keeps the fastest, and probes again every
    ``reprobe_s`` seconds; sooner when the batches get 1.5x slower than when it chose (another
    process took the cores), or when it runs on fewer than all cores and at least one core has
    been idle over the last second (the other process is gone; Linux's /proc/stat tells).
    A probe times the first candidate, and tries fewer threads only where other processes
    used half a core or more meanwhile (/proc/stat's busy time less this process's own): on
    cores nobody else uses, all of them are the fastest (measured on 2 cores: 1.8-2x one
    thread's speed, every model), and trying fewer cost 5-15% of a one-second epoch. Where
    /proc/stat can't be read, it tries every candidate. One
    loop after another can share a Tuner (``tuner_for``). The numbers computed do not depend on
    the count (every kernel writes its own slices; ``tests/test_threads.py``), so only
    the speed changes. Used as::

        tuner.start(); <one batch>; tuner.stop(images)

    A Tuner over one candidate (one core, or a count fixed by ``set_num_threads``), or not
    ``enabled``, only counts images. Training enables it on the numba backend alone: OpenBLAS,
    behind the numpy backend, gives slightly different sums on different thread counts
    (measured: the complex model's weights 8e-4 apart after 13 batches on 1 and 2 threads), so
    tuning there would make two runs of one seed differ.
    """

    PROBE = 4  # timed batches per candidate, at least
    PROBE_S = 0.1  # and at least this many seconds of them (short spells of noise average out)
    BETTER = 1.1  # fewer threads only when this much faster (else all cores)
    SLOWER = 1.5  # re-probe when the recent batches are this much slower than at the choice
    IDLE_EVERY_S = 1.0  # how often to look for idle cores while on fewer than all
    IDLE_AFTER_S = 3.0  # not sooner than this after a choice

    OTHERS = 0.5  # cores that other processes used while timing the first candidate: probe on

    def __init__(self, maximum=None, reprobe_s=20.0, clock=time.perf_counter, enabled=True,
                 cpu_times=None, own_cpu=_own_cpu_seconds):
        top = maximum or default_threads()
        self.candidates = candidate_counts(top)
        self.active = enabled and tuned() and top > 1
        self.reprobe_s = reprobe_s
        self.clock = clock
        self.chosen = top if self.active else None
        self.probing = []  # [candidate, untimed batches left, [seconds, images, batches]]
        self.results = {}  # candidate -> mean seconds per image in the last probe
        self.recent = []  # per-image times since the choice
        self.since = None  # when the current choice was made
        self.t0 = None
        self.images = {}  # count -> images trained on it (for the history)
        self.current = top if self.active else get_num_threads()
        self.idle_mark = None  # (time, idle jiffies, all jiffies) of the last look
        self.cpu_times = cpu_times or _cpu_jiffies
        self.own_cpu = own_cpu
        self.mark = None  # (time, jiffies, own CPU seconds) as the probe's first timing began

    def _begin_probe(self, untimed=0):
        self.results = {}
        self.probing = [[c, 0, [0.0, 0, 0]] for c in self.candidates]
        self.probing[0][1] = untimed
        self.mark = None

    def _others_used(self, now):
        """Cores that other processes kept busy on average since the mark; None: unknown."""
        counts, mark = self.cpu_times(), self.mark
        if counts is None or mark is None or now <= mark[0]:
            return None
        busy = (counts[1] - counts[0]) - (mark[1][1] - mark[1][0])
        return max(0.0, busy / _TICKS - (self.own_cpu() - mark[2])) / (now - mark[0])

    def start(self):
        if not self.active:
            return
        if self.since is None and not self.probing:  # the first batch compiles: not timed
            self._begin_probe(untimed=1)
        n = self.probing[0][0] if self.probing else self.chosen
        if n != get_num_threads():  # (another loop may have changed it)
            _apply(n)
        self.current = n
        self.t0 = self.clock()
        if self.probing and not self.results and self.mark is None and self.probing[0][1] == 0:
            counts = self.cpu_times()  # the first candidate's timing begins
            self.mark = None if counts is None else (self.t0, counts, self.own_cpu())

    def stop(self, images):
        self.images[self.current] = self.images.get(self.current, 0) + images
        if not self.active or self.t0 is None:
            return
        now = self.clock()
        seconds, images = now - self.t0, max(images, 1)
        self.t0 = None
        if self.probing:
            entry = self.probing[0]
            if entry[1] > 0:
                entry[1] -= 1
                return
            took = entry[2]
            took[0] += seconds
            took[1] += images
            took[2] += 1
            mean = took[0] / took[1]
            best = min(self.results.values(), default=None)
            hopeless = best is not None and took[2] >= 2 and mean > 2 * best
            if (took[2] >= self.PROBE and took[0] >= self.PROBE_S) or hopeless:
                self.results[entry[0]] = mean
                self.probing.pop(0)
                others = self._others_used(now) if len(self.results) == 1 else None
                if others is not None and others < self.OTHERS:  # the cores are ours: all
                    self.results.setdefault(self.candidates[0], mean)
                    self.probing = []
                if not self.probing:
                    self.chosen = self._choose()
                    self.since, self.recent = now, []
            return
        self.recent.append(seconds / images)
        if len(self.recent) > 2 * self.PROBE:
            self.recent.pop(0)
        slower = (len(self.recent) == 2 * self.PROBE and statistics.median(self.recent)
                  > self.SLOWER * self.results[self.chosen])
        if slower or now - self.since > self.reprobe_s or self._cores_idle(now):
            self._begin_probe()
            self.probing.sort(key=lambda e: e[0] != self.chosen)  # the current count first

    def _choose(self):
        """The fastest count, but fewer threads only when clearly faster than more."""
        chosen = self.candidates[0]
        for n in self.candidates[1:]:  # ever fewer threads (those timed)
            if n in self.results and self.results[n] * self.BETTER < self.results[chosen]:
                chosen = n
        return chosen

    def _cores_idle(self, now):
        """On fewer than all cores: was a core idle over the last second (say, another training
        ended)? Looks at most once a second; False where /proc/stat can't be read."""
        if self.chosen == self.candidates[0] or now - self.since < self.IDLE_AFTER_S:
            self.idle_mark = None
            return False
        if self.idle_mark is not None and now - self.idle_mark[0] < self.IDLE_EVERY_S:
            return False
        counts = self.cpu_times()
        if counts is None:
            return False
        mark, self.idle_mark = self.idle_mark, (now, *counts)
        if mark is None:
            return False
        idle, total = counts[0] - mark[1], counts[1] - mark[2]
        return total > 0 and idle / total * (os.cpu_count() or 1) >= 1.0

    def most_used(self):
        """The count that ran the most images since the last call (the fixed or current count
        when not tuning)."""
        counts, self.images = self.images, {}
        if not counts:
            return get_num_threads()
        return max(counts, key=counts.get)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        """Back to all cores, the count outside a tuned loop."""
        if self.active:
            if get_num_threads() != self.candidates[0]:
                _apply(self.candidates[0])
            self.current = self.candidates[0]
