"""One run at a time in a run directory: an advisory lock file that names its holder.

Two runs writing one run directory corrupt it (one removes the other's scratch folder, metrics
interleave, one resumes from the other's checkpoints). The runner therefore holds
:class:`RunLock` on ``<run_dir>/.lock`` for the whole run (rank 0 under torchrun). The lock is
``flock`` on that file, so the kernel releases it when its process dies, however it dies: a lock left
by a killed run is taken over by the next run, with a warning naming the dead holder. The file holds
the holder's pid, host and start time, so a second run exits with one line saying who holds it.
The lock lives as long as the run and the file is removed when the run ends.

``flock`` works on local disks and on NFSv4 (Linux maps it to a byte-range lock); on a shared
filesystem without lock support, two runs on one folder are not detected.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from moe_adapt.errors import MoEAdaptError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
"""The lock file's name inside the run directory."""


class RunDirectoryBusy(MoEAdaptError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """``with RunLock(run_dir):`` holds the run directory for this process, or raises
    :class:`RunDirectoryBusy` naming the process that holds it."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirectoryBusy(
                    f"run_dir={self.path.parent} is in use by {holder}: wait for that run to end, "
                    "or give this one another run_name"
                ) from None
            # the holder may have removed the file between our open and our lock: then we locked a
            # file nobody else will open, so start again on the one at the path now
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_holder(fd, default="")
        if previous:
            log.warning(
                "run_dir %s: taking over the lock left by %s (no longer running)", self.path.parent, previous
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and let go of the lock (the file first, so nobody locks it after us)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)  # closing releases the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_holder(fd: int, default: str = "another process") -> str:
    """``pid N on HOST since TIME`` from the lock file, or ``default`` when it holds no record."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "null")
        return f"pid {record['pid']} on {record['host']} since {record['started']}"
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        return default
