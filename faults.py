"""Fault injection for crash-safety tests: kill this process with SIGKILL at a named point of the run.

The trainer, the predictor and the atomic writer call :func:`point` at the moments a crash hurts most (inside a
training step, inside validation or test prediction, between a checkpoint's write and its rename, between folds,
while the submission is written). Nothing happens unless an environment variable asks for it:

    SKETCH_FAULT=train_step:37        SIGKILL on the 37th training step of this process
    SKETCH_FAULT_COUNTS=counts.json   at exit, write how often each point was reached (to choose kill points)

``bench/fault_injection.py`` drives both to kill a run at many moments and check that resuming reproduces it.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
from collections import Counter

_FAULT = os.environ.get("SKETCH_FAULT")
_COUNTS_PATH = os.environ.get("SKETCH_FAULT_COUNTS")
_counts: Counter = Counter()
_target: tuple[str, int] | None = None
if _FAULT:
    _name, _, _n = _FAULT.rpartition(":")
    _target = (_name, int(_n))


def _write_counts() -> None:
    with open(_COUNTS_PATH, "w") as f:
        json.dump(_counts, f)


if _COUNTS_PATH:
    atexit.register(_write_counts)


def point(name: str) -> None:
    """Mark a crash point; SIGKILL here if SKETCH_FAULT names it and this is its n-th visit."""
    if _target is None and _COUNTS_PATH is None:
        return
    _counts[name] += 1
    if _target is not None and _target == (name, _counts[name]):
        os.kill(os.getpid(), signal.SIGKILL)
