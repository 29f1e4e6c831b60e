"""One writer per run directory: a lock file ``RUN_DIR/run.lock`` holding the writer's process id
and host.

``fastcnf train`` (and ``train --resume``) takes the lock before it writes anything and releases it
when it ends, however it ends; a second writer on the same directory is refused with
:class:`RunLocked` naming the holder. The lock is an ``fcntl.flock`` on the file, which the
operating system releases when the holder dies (even by ``kill -9``): a lock file left behind by a
process that is gone is stale and is taken over, with a line saying so. ``eval``, ``score`` and
``sample`` never lock: they only read files that are written atomically (write to a temporary file,
then ``os.replace``).
"""
from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path
from typing import TextIO

__all__ = ["LOCK_NAME", "RunLocked", "RunLock", "lock_holder", "refuse_if_locked"]

#: the lock file's name inside the run directory
LOCK_NAME = "run.lock"


class RunLocked(RuntimeError):
    """Another process is writing to the run directory."""


def _read_holder(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError:
        return {}
    holder = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if value:
            holder[key.strip()] = value.strip()
    return holder


def _describe(holder: dict[str, str]) -> str:
    return f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def lock_holder(run_dir: str | Path) -> dict[str, str] | None:
    """The holder (``pid``, ``host``) of ``run_dir``'s lock if a live process holds it, else None."""
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _refusal(run_dir: Path, holder: dict[str, str]) -> RunLocked:
    return RunLocked(f"{run_dir} is being written by {_describe(holder)} (lock {Path(run_dir) / LOCK_NAME}); wait "
                     "for it to end or stop it, or train into another --out directory")


def refuse_if_locked(run_dir: str | Path) -> None:
    """Raise :class:`RunLocked` naming the holder when a live process holds ``run_dir``'s lock."""
    holder = lock_holder(run_dir)
    if holder is not None:
        raise _refusal(Path(run_dir), holder)


class RunLock:
    """The lock of one run directory (a context manager).

    Args:
        run_dir: the run directory (created).
        stream: where the take-over of a stale lock is reported.

    Raises:
        RunLocked: on entering, when a live process holds the lock.

    Example:
        >>> import tempfile
        >>> with RunLock(tempfile.mkdtemp()) as lock:
        ...     lock.path.name
        'run.lock'
    """

    def __init__(self, run_dir: str | Path, stream: TextIO | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.stream = stream or sys.stderr
        self.fd: int | None = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _refusal(self.run_dir, _read_holder(self.path)) from None
            # the file may have been unlinked by its previous holder between open and flock: retry
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _read_holder(self.path)
        if old.get("pid"):
            here = old.get("host") == socket.gethostname()
            gone = here and old["pid"].isdigit() and not _alive(int(old["pid"]))
            why = "which is gone" if gone else "which no longer holds it"
            print(f"fastcnf: taking over the stale lock of {self.run_dir} left by {_describe(old)} ({why})",
                  file=self.stream, flush=True)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid={os.getpid()}\nhost={socket.gethostname()}\n".encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
