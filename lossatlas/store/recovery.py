"""Crash recovery of a run file: the writer's SWMR protocol and the reader of a file whose writer died.

The protocol leaves a file that a reader can always open; the Recorder's safety against SIGKILL rests on this module.

The protocol. The writer (``RunWriter``) runs in HDF5 SWMR mode (libver="latest"). A row is written and
flushed in every dataset before the commit marker (``/checkpoints/step``, ``/log/step``, fill -1) grows,
so a reader, or a file left by a writer killed with SIGKILL, shows exactly the rows committed before: a
reader takes the rows up to the first -1. The file is built under a temporary name and linked into
place before SWMR starts, so a kill never leaves a stub. SWMR cannot create datasets: to add one the
writer closes the file, reopens it without SWMR, creates the datasets and restarts SWMR; HDF5's file
locks keep readers out meanwhile (they retry, ``open_h5``). Only a kill inside that window leaves
HDF5's "open for write" flags set in the superblock, and HDF5 then refuses every open of the file
(``h5clear -s`` would clear them on disk). The writer holds an exclusive ``flock`` on ``<file>.lock``
(``locks.py``): the kernel drops it when the writer dies, so ``writer_attached`` tells a live writer
from a dead one.

The reader (``open_read``) opens the file per call: with ``swmr=True`` while a writer is attached
(live reading), plainly otherwise (an SWMR read retries a damaged block for ever). A file whose writer
died with the flags set, or that was truncated, is read through ``_ReadView``: its bytes with the
superblock's flags cleared, the end of file fixed and the superblock checksum (``_lookup3``)
recomputed, so the file itself is never modified. A truncated file (``truncation``: shorter than its
superblock records, no writer attached) still opens that way; its intact checkpoints pass their
checksums and the damaged ones fail them.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Iterator

import h5py

from lossatlas.errors import UserError
from lossatlas.store.h5 import OPEN_FOR_WRITE, TRUNCATED, OpenError, damage_is_user_error, first_line, open_h5
from lossatlas.store.locks import writer_attached


def _lookup3(data: bytes) -> int:
    """Bob Jenkins' lookup3 ``hashlittle`` (initval 0): the checksum of an HDF5 v2/v3 superblock."""
    m = 0xFFFFFFFF

    def rot(x: int, k: int) -> int:
        return ((x << k) | (x >> (32 - k))) & m

    def words(block: bytes) -> tuple[int, int, int]:
        return tuple(int.from_bytes(block[i:i + 4], "little") for i in (0, 4, 8))  # type: ignore[return-value]

    a = b = c = (0xDEADBEEF + len(data)) & m
    while len(data) > 12:
        x, y, z = words(data[:12])
        a, b, c = (a + x) & m, (b + y) & m, (c + z) & m
        a = ((a - c) & m) ^ rot(c, 4); c = (c + b) & m  # noqa: E702 - the mix, as in lookup3.c
        b = ((b - a) & m) ^ rot(a, 6); a = (a + c) & m  # noqa: E702
        c = ((c - b) & m) ^ rot(b, 8); b = (b + a) & m  # noqa: E702
        a = ((a - c) & m) ^ rot(c, 16); c = (c + b) & m  # noqa: E702
        b = ((b - a) & m) ^ rot(a, 19); a = (a + c) & m  # noqa: E702
        c = ((c - b) & m) ^ rot(b, 4); b = (b + a) & m  # noqa: E702
        data = data[12:]
    if not data:
        return c
    x, y, z = words(data + bytes(12 - len(data)))
    a, b, c = (a + x) & m, (b + y) & m, (c + z) & m
    c = ((c ^ b) - rot(b, 14)) & m  # the final mix
    a = ((a ^ c) - rot(c, 11)) & m
    b = ((b ^ a) - rot(a, 25)) & m
    c = ((c ^ b) - rot(b, 16)) & m
    a = ((a ^ c) - rot(c, 4)) & m
    b = ((b ^ a) - rot(a, 14)) & m
    c = ((c ^ b) - rot(b, 24)) & m
    return c


class _ReadView(io.RawIOBase):
    """The file as read-only bytes, its superblock's "open for write" flags cleared and its end of file fixed.

    The end of file is the larger of the real and the stored one (the missing tail of a truncated file reads as
    zeros).

    A version 2/3 superblock with 8-byte offsets is 48 bytes: signature (0-7), version (8), size of
    offsets (9), size of lengths (10), file consistency flags (11), base address (12-19), extension
    address (20-27), end of file (28-35), root group address (36-43), and the ``_lookup3`` checksum of
    bytes 0-43 (44-47), which the view recomputes.

    A writer killed while outside SWMR (creating datasets) leaves those flags set and HDF5 then
    refuses every open (``h5clear -s`` would clear them on disk); this view lets a reader open the
    file without modifying it. A truncated file is refused by HDF5 as a whole; through this view
    its intact checkpoints stay readable and the damaged ones fail their checksums.
    """

    def __init__(self, path: Path) -> None:
        self._f = open(path, "rb")
        head = bytearray(self._f.read(48))
        if head[:8] != b"\x89HDF\r\n\x1a\n" or head[8] not in (2, 3) or head[9] != 8:
            self._f.close()
            raise ValueError("not a version 2/3 superblock with 8-byte offsets")
        # a killed SWMR writer leaves a stale (short) end of file in the superblock, a truncated file a long one
        self._size = max(self._f.seek(0, 2), int.from_bytes(head[28:36], "little"))
        head[11] = 0
        head[28:36] = self._size.to_bytes(8, "little")
        head[44:48] = _lookup3(bytes(head[:44])).to_bytes(4, "little")
        self._head = bytes(head)
        self._f.seek(0)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 2:
            return self._f.seek(self._size + pos)
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, buf: Any) -> int:
        pos = self._f.tell()
        n = self._f.readinto(buf)
        if pos < len(self._head) and n:
            k = min(n, len(self._head) - pos)
            memoryview(buf)[:k] = self._head[pos:pos + k]
        want = min(len(memoryview(buf).cast("B")), max(0, self._size - pos))
        if n < want:  # past the real end of a truncated file
            memoryview(buf).cast("B")[n:want] = bytes(want - n)
            self._f.seek(pos + want)
            n = want
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


@contextlib.contextmanager
def open_read(path: Path) -> Iterator[h5py.File]:
    """Open for reading: with SWMR while a writer is attached (live reading), else plainly.

    SWMR reads retry a damaged block for ever, hence plainly without a writer. A file whose writer died (flags
    left set) or that was truncated is read through ``_ReadView``. An HDF5 error while reading becomes a
    UserError.
    """
    live = writer_attached(path)
    try:
        f = open_h5(path, "r", swmr=True) if live else open_h5(path, "r")
    except OpenError as e:
        if e.failure not in (OPEN_FOR_WRITE, TRUNCATED):
            raise
        if live:
            raise UserError(f"{path}: a writer without SWMR holds the file; wait for it to finish") from None
        try:
            raw = _ReadView(path)
        except ValueError:
            raise e from None
        try:
            f = h5py.File(raw, "r")
        except OSError as err:
            raw.close()
            raise UserError(f"{path}: cannot open the HDF5 file ({first_line(err)}); it was truncated or "
                            "corrupted — restore it from a copy") from None
        try:
            with damage_is_user_error(path), f:
                yield f
        finally:
            raw.close()
        return
    with damage_is_user_error(path), f:
        yield f


def truncation(path: Path) -> tuple[int, int] | None:
    """(real size, stored end of file) when a file with no writer attached is shorter than its superblock says.

    The superblock is version 2/3; a killed SWMR writer leaves a stored end that is short, never long.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(48)
            real = fh.seek(0, 2)
    except OSError:
        return None
    if head[:8] != b"\x89HDF\r\n\x1a\n" or len(head) < 48 or head[8] not in (2, 3) or head[9] != 8:
        return None
    stored = int.from_bytes(head[28:36], "little")
    if real >= stored or writer_attached(path):
        return None
    return real, stored
