"""Integrity of the files the store writes: checksums, one-line full-disk errors, whole files.

A full disk is refused with one line. Files appear whole or not at all: each is built under a temporary name next to
its path, then linked or renamed into place; the temporaries of dead processes are removed by the next writer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from lossatlas.errors import UserError
from lossatlas.store.h5 import DISK_FULL, hdf5_says


def digest(arr: np.ndarray) -> int:
    """64-bit BLAKE2b of an array's raw bytes (a C-contiguous array, as written or as read back)."""
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(arr) if arr.ndim else arr.tobytes(),
                                          digest_size=8).digest(), "little")


def disk_full(exc: BaseException | None) -> bool:
    """Whether ENOSPC/EDQUOT appears anywhere in an exception's chain.

    It counts as an ``OSError``'s errno, or inside an HDF5 message that h5py did not lift the errno out of.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if hdf5_says(exc, DISK_FULL):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system of ``path`` (None when it does not say: some report a size of 0)."""
    try:
        usage = shutil.disk_usage(path.parent if str(path.parent) else ".")
    except OSError:
        return None
    return usage.free if usage.total > 0 else None


def size_text(n: int) -> str:
    """``n`` bytes as "1.5 MiB" (or "512 bytes" below a MiB)."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def disk_full_error(path: Path, fix: str = "free some space and rerun the same command to resume") -> UserError:
    """The one-line error for a full disk under ``path``, with the free space left and ``fix``."""
    free = free_bytes(path)
    left = "free space unknown" if free is None else f"{size_text(free)} free"
    return UserError(f"{path}: the disk is full ({left}); {fix}")


_TEMP_TAG = ".tmp-"


def temp_path(path: Path) -> Path:
    """The hidden name next to ``path`` under which this process builds it: ``.<name>.tmp-<pid>``."""
    return path.with_name(f".{path.name}{_TEMP_TAG}{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_dead_temps(path: Path) -> None:
    """Delete the temporaries of ``path`` left by processes that died (those of live ones are theirs)."""
    prefix = f".{path.name}{_TEMP_TAG}"
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent if str(path.parent) else "."):
            pid = entry.name[len(prefix):]
            if entry.name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def publish(tmp: Path, path: Path, *, overwrite: bool) -> None:
    """Give the finished file ``tmp`` its name ``path`` in one step.

    Without ``overwrite`` never replace a file that appeared meanwhile (a hard link fails on an existing name,
    where a rename would clobber it).
    """
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise UserError(f"{path}: already exists; pass --force (overwrite=True) to replace it") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        if path.exists():  # a file system without hard links: check, then rename
            raise UserError(f"{path}: already exists; pass --force (overwrite=True) to replace it") from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def written_aside(path: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """A temporary path next to ``path`` to build a file under, renamed to ``path`` on success.

    When the block ends without error it is renamed to ``path`` (an existing ``path`` is refused unless
    ``overwrite``), otherwise deleted. A file already at ``path`` stays untouched until the new one is complete.
    """
    path = Path(path)
    remove_dead_temps(path)
    tmp = temp_path(path)
    try:
        yield tmp
        publish(tmp, path, overwrite=overwrite)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (the same inode, or the same resolved path if either is missing)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


class Damaged(Exception):
    """Stored data that fails its checksum or cannot be read; ``reason`` says what fails.

    The data is a checkpoint tensor (``tensor``), or with ``tensor`` None another part (a checkpoint's group, a
    results entry).
    """

    def __init__(self, tensor: str | None, reason: str) -> None:
        super().__init__(reason)
        self.tensor, self.reason = tensor, reason
