"""How many CPU threads the engine's PyTorch uses: the cores this process can really use, not all of them.

PyTorch's default is one intra-op thread per core it sees. Beside other CPU-bound work (the web
process, the database, a second worker, or anything else on a small box) those threads spin in
OpenMP barriers against each other for the cores that are really free, and a job becomes many
times slower instead of a little slower: on a 2-core box beside another 2-thread PyTorch process,
``studio train --base-model tiny --steps 20 --prior-images 16`` took 227.8 s with PyTorch's two
threads and 10.1 s with one (docs/benchmarks.md, "Threads beside other work").

:func:`usable_cpus` counts the cores the process may run on (its CPU affinity, capped by a cgroup
CPU quota, as containers set); :func:`default_threads` leaves one of them to the rest of the
machine on a small box (up to 4 cores: the web process and the database run beside the worker)
and uses the rest; :func:`apply_threads` sets PyTorch's intra-op and inter-op pools. This module
imports torch only inside :func:`apply_threads`.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

# Up to this many usable cores, one is left to the web process, the database and the rest.
SMALL_MACHINE_CORES = 4
THREADS_ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _cgroup_quota_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 ``cpu.max`` or v1 ``cfs_quota_us``); None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max" and float(period) > 0:
            return float(quota) / float(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = float((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = float((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process can use: its affinity set, capped by a cgroup quota (rounded up), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota_cpus(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def default_threads(cores: int) -> int:
    """Threads for a worker on ``cores`` usable cores: all but one on a small machine, else all."""
    if cores <= 1:
        return 1
    return cores - 1 if cores <= SMALL_MACHINE_CORES else cores


def choose_threads(configured: int | None = None) -> int:
    """``configured`` when set (> 0), else :func:`default_threads` of :func:`usable_cpus`."""
    if configured is not None and configured > 0:
        return configured
    return default_threads(usable_cpus())


def thread_environment(threads: int) -> dict[str, str]:
    """Environment variables that give a process started with them ``threads`` OpenMP/MKL threads from its
    first import of torch (before any Python code could call :func:`apply_threads`)."""
    return {name: str(threads) for name in THREADS_ENVIRONMENT}


def apply_threads(threads: int) -> int:
    """Set PyTorch's intra-op and inter-op thread pools to ``threads``; returns the intra-op count in force.

    The inter-op pool can be sized only once per process and before any parallel work: a process
    that already did (a forked job whose parent set it) keeps the size it has.
    """
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        log.debug("PyTorch's inter-op pool was already sized (%d threads)", torch.get_num_interop_threads())
    return int(torch.get_num_threads())
