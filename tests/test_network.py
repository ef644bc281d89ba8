"""No network at import: every product module imports in a fresh process whose sockets refuse anything but loopback.

The process records each name lookup or connect to a non-loopback address (and refuses it); the test asserts the
record is empty. A control run imports albumentations bare to show the trap catches its PyPI update check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))

# Runs before anything is imported: socket's lookups and connects go through these checks.
TRAP = r"""
import atexit, ipaddress, json, socket, sys
TRIED = []
LOCAL = {"localhost", "localhost.localdomain", "", None}

def _local(host):
    if host in LOCAL:
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False

def _check(what, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(address, (str, bytes)) and what == "connect":
        return  # an AF_UNIX path
    if not _local(host):
        TRIED.append(f"{what} {address!r}")
        raise OSError(f"network refused in this test: {what} {address!r}")

_lookup, _connect, _connect_ex, _create = (socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex,
                                           socket.create_connection)

def getaddrinfo(host, *a, **k):
    _check("getaddrinfo", host)
    return _lookup(host, *a, **k)

def connect(self, address):
    _check("connect", address)
    return _connect(self, address)

def connect_ex(self, address):
    _check("connect", address)
    return _connect_ex(self, address)

def create_connection(address, *a, **k):
    _check("create_connection", address)
    return _create(address, *a, **k)

socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = getaddrinfo, connect, connect_ex
socket.create_connection = create_connection
atexit.register(lambda: print("TRIED " + json.dumps(TRIED)))
"""


def _run(imports: list[str], env_extra: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, list]:
    code = TRAP + "\n" + "\n".join(f"import {name}" for name in imports) + "\n"
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    env.update({"HF_HUB_OFFLINE": "1", **(env_extra or {})})
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TRIED ")]
    tried = json.loads(lines[-1][len("TRIED "):]) if lines else None
    return proc, tried


def test_importing_every_module_tries_no_connection():
    assert {"augmentation", "main", "train", "inference"} <= set(MODULES)
    proc, tried = _run(MODULES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tried == [], f"network tried at import: {tried}\n{proc.stderr[-2000:]}"


def test_the_trap_catches_the_albumentations_update_check():
    # Without the variable, albumentations looks PyPI up on import: the trap records it (and refuses it).
    proc, tried = _run(["albumentations"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tried and any("pypi" in t for t in tried), (tried, proc.stderr[-2000:])
