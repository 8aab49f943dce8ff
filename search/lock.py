"""The lock of a run directory: one writing job at a time.

A job that opens a run directory for writing creates ``.spt-lock`` there atomically
(``O_CREAT | O_EXCL``) holding its PID, host and command; it is removed when the job
ends. A second writer is refused, naming the holder. A lock left by a job that died
(SIGKILL, a crash, a power cut) is stale: a lock of this host whose PID no longer runs
is taken over with a warning. A lock of another host cannot be checked from here and
counts as held, unless the caller knows that holder is dead (an Optuna heartbeat said so,
see :func:`known_dead`). Under ``torchrun`` only rank 0 takes it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from spt.errors import UserError
from spt.files import raise_write_error

LOCK_FILE = ".spt-lock"
logger = logging.getLogger("spt")

_HELD: set[Path] = set()  # lock files this process holds
_DEAD: set[str] = set()  # "host:pid" of holders known to be dead


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as written in the lock file."""

    pid: int
    host: str
    started: str = "?"
    command: str = "?"

    @property
    def worker(self) -> str:
        return f"{self.host}:{self.pid}"

    def ours(self) -> bool:
        return self.host == socket.gethostname() and self.pid == os.getpid()

    def stale(self) -> bool:
        """Known to be dead: a PID of this host that no longer runs, or declared dead."""
        if self.worker in _DEAD:
            return True
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.started} ({self.command})"


def known_dead(worker: str) -> None:
    """Declare the holder ``host:pid`` dead, so that its locks may be taken over."""
    _DEAD.add(worker)


def holder(directory: Path) -> Holder | None:
    """The holder of ``directory``'s lock (``None``: not locked)."""
    path = directory / LOCK_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Holder(int(data["pid"]), str(data["host"]), str(data.get("started")), str(data.get("command")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError("--out", f"the lock {path} is unreadable; if no spt job uses {directory}, delete it") from None


def check_free(directory: Path) -> None:
    """Refuse a ``directory`` another live job holds (stale and own locks pass)."""
    found = holder(directory)
    if found is not None and not found.ours() and not found.stale():
        raise UserError(
            "--out", f"{directory} is in use by another spt job ({found.describe()}); wait for it to end or choose "
            f"another --out (if that job is gone, delete {directory / LOCK_FILE})"
        )


def acquire(directory: Path) -> None:
    """Take ``directory``'s lock (a stale one is taken over with a warning)."""
    path = directory.absolute() / LOCK_FILE
    if path in _HELD:
        return
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:2]])}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            found = holder(directory)
            if found is not None and (found.ours() or found.stale()):
                logger.warning("taking over the stale lock of %s: %s is no longer running", directory, found.describe())
                path.unlink(missing_ok=True)
                continue
            check_free(directory)
            continue  # released meanwhile
        _write_record(fd, path, record)
        _HELD.add(path)
        return
    check_free(directory)
    raise UserError("--out", f"could not lock {directory}: other jobs keep taking it; try again")


def _write_record(fd: int, path: Path, record: dict) -> None:
    """Write the holder's ``record`` into the new lock file; a write that fails (a full disk)
    removes the file, so that no empty lock - unreadable - stays to block the next job."""
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
    except BaseException as exc:
        path.unlink(missing_ok=True)
        raise_write_error(exc, path)


def release(directory: Path) -> None:
    """Give up ``directory``'s lock if this process holds it."""
    path = directory.absolute() / LOCK_FILE
    if path not in _HELD:
        return
    _HELD.discard(path)
    try:
        found = holder(path.parent)
    except UserError:
        return
    if found is not None and found.ours():
        path.unlink(missing_ok=True)


def release_all() -> None:
    """Give up every lock this process holds (at exit, and at the end of each CLI command)."""
    for path in list(_HELD):
        release(path.parent)


atexit.register(release_all)
