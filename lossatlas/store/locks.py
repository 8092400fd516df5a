"""The ``<file>.lock`` sidecars: the run writer's lock, and the lock around one change of a results file.

The kernel drops the run writer's lock when the writer dies, so a reader tells a live writer from a dead one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

from lossatlas.errors import UserError
from lossatlas.store.h5 import LOCK_WAIT_S
from lossatlas.store.integrity import disk_full, disk_full_error


def lock_path(path: Path) -> Path:
    """The sidecar ``<file>.lock`` next to ``path``."""
    return path.with_name(path.name + ".lock")


def writer_attached(path: str | Path) -> bool:
    """Whether a live ``RunWriter`` holds ``path`` (its ``.lock`` sidecar is flock-ed)."""
    try:
        fd = os.open(lock_path(Path(path)), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we got
    return False


class WriterLock:
    """An exclusive flock on ``<file>.lock``, released by the kernel if the writer dies."""

    def __init__(self, path: Path) -> None:
        self.path = lock_path(path)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{path}: cannot create the run file there ({e.strerror}); check the directory") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(self.fd, 64, 0).decode(errors="replace").strip()
            os.close(self.fd)
            raise UserError(f"{path}: another process (pid {pid or '?'}) is writing this run; "
                            "stop it or write to another file") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Remove the sidecar and drop the lock."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """An exclusive flock on ``<path>.lock`` around one change of ``path``, by any process.

    The sidecar is removed on release; a waiter that locked a removed sidecar retries on the current one.
    """
    lock = lock_path(path)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if disk_full(e):
                raise disk_full_error(path) from None
            raise UserError(f"{path}: cannot write next to it ({e.strerror}); check the folder's permissions") from None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise UserError(f"{path}: another process has been writing it for {LOCK_WAIT_S:.0f} s "
                                        "(its lock file is held); wait for it to finish and rerun") from None
                    time.sleep(0.005)
            try:
                current = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)  # the holder removed this sidecar meanwhile: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)
