"""Command-line plumbing shared by the scripts: an argument parser whose errors are one line and exit with 2."""

from __future__ import annotations

import argparse
import os


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose ``error`` prints ``prog: error: message`` on one line, without the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


def default_workers() -> int:
    """Data-loader processes for this machine: the usable cores, at most 8."""
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def default_cache_gb() -> float:
    """The decoded-image cache's default bound: a quarter of this machine's memory, in GiB (4 where unknown)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4.0
    return round(total / 4 / 2**30, 1)
