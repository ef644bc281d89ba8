"""The thread budget of a process: how many cores it may use, shared with the suite's other processes on the machine.

A run that takes every core for its intra-op threads, beside another run (a second ``main.py``, a ``tune.py``
trial, side-by-side ``--fold`` workers, the processes of a ``torchrun``) doing the same, oversubscribes the machine:
OpenMP threads spin waiting for cores the other process holds, and the two together train slower than one alone.
Here each process sizes itself from:

* the cores it may use: its CPU affinity, the cgroup's CPU quota (containers, ``docker --cpus``), and
  ``OMP_NUM_THREADS`` when it is set (an upper bound the user chose);
* the suite's processes sharing them: every training or predicting process registers itself for its lifetime in
  a folder of lock files (``$TMPDIR/sketch-suite-<uid>/<pid>.busy``, held with ``fcntl.flock``, so a killed process
  leaves no live entry), and under ``torchrun`` at least ``LOCAL_WORLD_SIZE``.

:func:`budget` divides the cores between the sharing processes (at least one thread each): the intra-op threads of
torch, one inter-op thread (the suite runs one graph at a time), and the loader workers a loader may start. A
training run calls :func:`rebalance` at each epoch, so a run started alone gives up cores when a second one starts
and takes them back when it ends; ``--threads N`` sets the budget by hand and turns that off, as ``--deterministic``
does (a thread count that changes can change float reductions, so a deterministic run keeps its own).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

_logger = logging.getLogger(__name__)

_registration: dict[str, object] = {}  # this process's lock file, held open for its lifetime
_applied: list = []  # the budget in force in this process (the last one applied)


@dataclass(frozen=True)
class Budget:
    """What one process may use: ``threads`` intra-op threads and at most ``workers`` loader workers per loader."""

    cores: int  # the cores this process may use before sharing
    sharing: int  # the suite's processes sharing them (this one included)
    threads: int
    workers: int

    def describe(self) -> str:
        return (f"{self.threads} thread(s) of {self.cores} usable core(s) shared by {self.sharing} process(es), "
                f"loaders of at most {self.workers} worker(s)")


def cgroup_cores(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores(environ: dict | None = None, cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: its affinity, capped by the cgroup quota and by ``OMP_NUM_THREADS``."""
    environ = os.environ if environ is None else environ
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cores(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, int(quota)))  # a fraction of a core still runs one thread
    with contextlib.suppress(ValueError):
        omp = int(environ.get("OMP_NUM_THREADS", "").split(",")[0])
        if omp > 0:
            cores = min(cores, omp)
    return max(1, cores)


def registry() -> Path:
    """The folder of lock files of the suite's live processes on this machine (one per user)."""
    return Path(tempfile.gettempdir()) / f"sketch-suite-{os.getuid()}"


def register(folder: Path | None = None) -> None:
    """Count this process among the suite's live ones until it exits (idempotent)."""
    if _registration:
        return
    folder = registry() if folder is None else folder
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        handle = open(folder / f"{os.getpid()}.busy", "w")  # noqa: SIM115 (held open for the process's lifetime)
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:  # a read-only or odd temporary folder: the budget then counts this process alone
        _logger.debug("thread budget: cannot register in %s: %s", folder, e)
        return
    _registration.update(handle=handle, folder=folder)


def live_processes(folder: Path | None = None) -> int:
    """The suite's processes registered and alive (their lock is held); entries of dead processes are removed."""
    folder = registry() if folder is None else folder
    own = _registration.get("handle")
    count = 0
    for path in folder.glob("*.busy") if folder.is_dir() else ():
        if own is not None and path.name == f"{os.getpid()}.busy":
            count += 1
            continue
        try:
            with open(path) as f:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # free: its process is gone
            path.unlink(missing_ok=True)
        except BlockingIOError:
            count += 1
        except OSError:
            continue
    return count


def budget(threads: int | None = None, workers: int | None = None, fixed: bool = False,
           environ: dict | None = None, folder: Path | None = None) -> Budget:
    """This process's share of the cores. ``threads``: set by hand (``--threads``); ``workers``: the loader workers
    asked for (``--num_workers``), capped by the share; ``fixed``: ignore the other processes of the machine (a
    ``--deterministic`` run), counting only those of its own ``torchrun``."""
    environ = os.environ if environ is None else environ
    cores = usable_cores(environ)
    local = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    sharing = local if fixed or threads else max(local, live_processes(folder), 1)
    share = threads if threads else max(1, cores // sharing)
    asked = share if workers is None else workers
    return Budget(cores=cores, sharing=sharing, threads=share, workers=min(asked, share) if asked else 0)


def apply(b: Budget) -> None:
    """Set torch's intra-op threads to the budget, its inter-op threads and OpenCV's to one where still possible,
    and remember the budget for :func:`loader_workers`."""
    import cv2
    import torch

    with contextlib.suppress(RuntimeError):  # settable once, before any inter-op work
        torch.set_num_interop_threads(1)
    if torch.get_num_threads() != b.threads:
        torch.set_num_threads(b.threads)
    # One OpenCV thread: its decoding and resizing run in the loader workers (forked: they inherit it), one image
    # each, where a pool per worker would oversubscribe the cores the budget gave them. Set here, in the parent,
    # before any worker is forked: changing it inside a forked worker can hang on the parent's pool.
    cv2.setNumThreads(1)
    _applied[:] = [b]


def loader_workers(asked: int) -> int:
    """The worker processes a loader may start: ``asked`` (``--num_workers``), at most the budget's."""
    return min(asked, _applied[0].workers) if _applied and asked else asked


def take(threads: int | None = None, workers: int | None = None, fixed: bool = False) -> Budget:
    """A training or predicting process's start: count it among the suite's processes on this machine, take its
    share of the cores (:func:`budget`, :func:`apply`) and log it."""
    register()
    b = budget(threads, workers, fixed)
    apply(b)
    _logger.info("thread budget: %s", b.describe())
    return b


def rebalance(threads: int | None, fixed: bool) -> Budget | None:
    """At an epoch boundary: the budget again, applied and logged when the sharing changed (None when set by hand
    or fixed)."""
    if threads or fixed:
        return None
    import torch

    b = budget(workers=_applied[0].workers if _applied else None)
    if b.threads != torch.get_num_threads():
        _logger.info("thread budget: %s (was %d thread(s))", b.describe(), torch.get_num_threads())
        apply(b)
    return b
