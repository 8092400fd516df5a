"""The run file and the results file (HDF5): the only module in lossatlas that imports h5py.

Run file (format 1), written by one ``RunWriter`` and read by any number of ``RunReader``s::

    /                             attrs: lossatlas_format="run", format_version=1, model, data,
                                         optimizer, attrs (JSON strings), loss, created_at,
                                         lossatlas_version, run_id, spec_signatures,
                                         checksums="checkpoints/digest"
    /checkpoints/step             (K,) int64, fill -1: the commit marker, grown last
    /checkpoints/has_optimizer    (K,) uint8: row k carries optimizer state
    /checkpoints/params/<key>     (K, *shape) in the tensor's dtype, chunk (1, *shape)
    /checkpoints/buffers/<key>    likewise (BatchNorm running stats, num_batches_tracked, ...)
    /checkpoints/optimizer/<param>/<state>   likewise (Adam's exp_avg, exp_avg_sq, step)
    /checkpoints/digest           (K, T) uint64, fill 0: column ``digest_column`` (an attr of each
                                  tensor dataset) of row k is the 64-bit BLAKE2b of that tensor's row k
    /checkpoints/attrs/<name>     (K,) float64, NaN where a checkpoint did not give it (epoch, lr)
    /log/step                     (N,) int64, fill -1; /log/<name> (N,) float64, NaN where absent

Checkpoint k is the row k of every ``/checkpoints`` dataset; a dataset created after the run
started carries ``first_row`` (the first row it holds). Every tensor dataset carries
``torch_dtype``; h5py has no bfloat16 (nor float8), so those tensors are stored as their raw bits
(uint16 / uint8) and viewed back on reading: every dtype round-trips bit for bit. A '/' in a key
is written as '%2F' (and '%' as '%25'). Nothing is pickled: specs and metadata are JSON.

Integrity: every checkpoint tensor row has a checksum, written before the commit and checked on
every read, so a truncated or corrupted file (a missing chunk reads as zeros, and HDF5's own
fletcher32 passes an all-zero chunk) raises a UserError naming the step and the tensor instead of
handing out zeros; ``RunReader.verify()`` checks every checkpoint. One (K, T) dataset holds all
checksums, so a checkpoint costs one more dataset write. A file shorter than its superblock says
(and no writer attached) is refused as truncated unless read to verify it. Files from before
checksums (no ``checksums`` attr) read as before, reported "unverified".

Live reading and crash safety: the writer runs in HDF5 SWMR mode (libver="latest"). A row is
written and flushed in every dataset before ``/checkpoints/step`` (``/log/step``) grows, so a
reader, or a file left by a writer killed with SIGKILL, shows exactly the checkpoints and log rows
committed before. The file is built under a temporary name (``.<name>.tmp-<pid>``; the temporaries
of dead processes are removed by the next writer) and linked into place before SWMR starts, so a
kill never leaves a stub. SWMR cannot create datasets, so when a new name appears (first
checkpoint, a new log name) the writer closes the file, reopens it without SWMR, creates the
datasets and restarts SWMR; HDF5's file locks keep readers out meanwhile (readers retry). Only a
kill inside that short window can damage the file (declare log names up front with ``log_names=``
to keep windows to the first checkpoint and log flush). Readers open the file per call: with
``swmr=True`` while a writer is attached, plainly otherwise (an SWMR read retries a damaged block
for ever); a file whose writer was killed (flags left set) or that was truncated is read through a
view with HDF5's "open for write" flags cleared and the end of file fixed (``_ReadView``), never
modified. The writer holds an exclusive ``flock`` on ``<file>.lock`` (holding its pid): the kernel
drops it when the writer dies, so ``writer_attached()`` is False after a kill, and a stale sidecar
is harmless. A checkpoint that would not fit on the disk is refused before HDF5 writes it (HDF5
crashes on a full disk).

Results file (format 1), one group per (probe, config key, step)::

    /                             attrs: lossatlas_format="results", format_version=1, run_fingerprint
    /<probe>/<key>/<step>/        step zero-padded to 10 digits, or "none"; one dataset per value and
                                  coord; a 1-D coord named like a value's axis is that axis' HDF5
                                  dimension scale (every axis is labelled); bool arrays are uint8 and
                                  strings variable-length UTF-8, with attr ``dtype`` saying so; each
                                  dataset's attr ``digest`` is the checksum of its dtype, shape and bytes
                                  attrs: config, meta, dims (JSON), data_fingerprint, lossatlas_version,
                                         elapsed_s, status ("complete" | "partial"), written_at,
                                         digest (of these attrs and the dataset names)

Every change of a results file is copy-on-write under an exclusive ``flock`` on ``<file>.lock``:
the file is read into memory, changed there, written to ``.<name>.tmp-<pid>``, synced and renamed
over the original (creation links it, never clobbering a file made meanwhile). A failure (a full
disk, a kill) leaves every earlier result as it was, and writers in several processes all land.
HDF5 itself never meets the disk during a change. Reading checks the checksums.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import h5py
import numpy as np
import torch
from torch import Tensor

from lossatlas._version import __version__
from lossatlas import trust
from lossatlas.errors import UserError
from lossatlas.probes.base import Result

FORMAT_VERSION = 1
STATUSES = ("complete", "partial")
LOCK_WAIT_S = 30.0  # how long an open waits for another process's HDF5 file lock
# dtypes numpy cannot hold: stored as their raw bits
_RAW_BITS: dict[torch.dtype, tuple[torch.dtype, np.dtype]] = {
    torch.bfloat16: (torch.int16, np.dtype(np.uint16)),
    **{getattr(torch, n): (torch.uint8, np.dtype(np.uint8))
       for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)},
}
_ROW_CHUNK_BYTES = 64 * 2**20  # at most this much per chunk of a checkpoint row
_DISK_MARGIN = 2**20  # free bytes a checkpoint leaves for HDF5's metadata and the log
_DIGESTS = "checkpoints/digest"  # (K, T) uint64: a checksum per checkpoint row per tensor


# -- small helpers ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8192)  # the log escapes the same names every step
def _escape(name: str) -> str:
    if not isinstance(name, str) or name in ("", ".", ".."):
        raise ValueError(f"invalid name {name!r}: names must be non-empty strings other than '.' and '..'")
    return name.replace("%", "%25").replace("/", "%2F")


def _unescape(name: str) -> str:
    return name.replace("%2F", "/").replace("%25", "%")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _dumps(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, default=_json_default, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"{what} must be JSON-able (dicts, lists, numbers, strings): {e}") from None


def _tensor_to_numpy(value: Any, what: str) -> tuple[np.ndarray, str]:
    """A tensor as a numpy array holding the same bits, and the torch dtype's name."""
    t = torch.as_tensor(value).detach()
    name = str(t.dtype).removeprefix("torch.")
    t = t.cpu().resolve_conj().resolve_neg().contiguous()
    if t.dtype in _RAW_BITS:
        int_dtype, np_dtype = _RAW_BITS[t.dtype]
        return t.view(int_dtype).numpy().view(np_dtype), name
    try:
        return t.numpy(), name
    except TypeError as e:
        raise ValueError(f"{what}: cannot store a tensor of dtype {t.dtype}: {e}") from None


def _numpy_to_tensor(arr: np.ndarray, dtype_name: str) -> Tensor:
    dtype = getattr(torch, dtype_name)
    arr = np.asarray(arr)  # h5py hands back a numpy scalar for a 0-d row
    if not arr.flags.c_contiguous:
        arr = arr.copy()
    if dtype in _RAW_BITS:
        int_dtype, _ = _RAW_BITS[dtype]
        return torch.from_numpy(arr.view(str(int_dtype).removeprefix("torch."))).view(dtype)
    return torch.from_numpy(arr)


def _row_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunk (1, *shape): one checkpoint row per chunk, split along the largest axes if huge."""
    chunk = [max(1, d) for d in shape]
    while math.prod(chunk) * itemsize > _ROW_CHUNK_BYTES:
        i = int(np.argmax(chunk))
        chunk[i] = (chunk[i] + 1) // 2
    return (1, *chunk)


def _is_lock_error(e: OSError) -> bool:
    return e.errno in (errno.EAGAIN, errno.EACCES) or "unable to lock file" in str(e)


def _open_h5(path: Path, mode: str, **kwargs: Any) -> h5py.File:
    """``h5py.File`` with a retry while another process holds its lock, and one-line errors."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            return h5py.File(path, mode, **kwargs)
        except FileNotFoundError:
            raise UserError(f"{path}: no such file; check the path") from None
        except OSError as e:
            if _is_lock_error(e) and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            if _is_lock_error(e):
                raise UserError(f"{path}: another process holds the file locked; wait for it to finish "
                                "(a run written with swmr=False cannot be read while it is written)") from None
            if "signature" in str(e):
                raise UserError(f"{path}: not an HDF5 file; pass a lossatlas run file (.h5) or results file") from None
            raise UserError(f"{path}: cannot open the HDF5 file ({e}); it may be damaged or in use") from None


# -- integrity: digests, a full disk, files that appear whole or not at all ------------------------------
def _digest(arr: np.ndarray) -> int:
    """64-bit BLAKE2b of an array's raw bytes (a C-contiguous array, as written or as read back)."""
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(arr) if arr.ndim else arr.tobytes(),
                                          digest_size=8).digest(), "little")


def _disk_full(exc: BaseException | None) -> bool:
    """Whether ENOSPC/EDQUOT appears anywhere in an exception's chain (HDF5 reports it inside a message)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if any(s in text for s in ("No space left on device", "Disk quota exceeded",
                                   f"errno = {errno.ENOSPC},", f"errno = {errno.EDQUOT},")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the file system of ``path`` (None when it does not say: some report a size of 0)."""
    try:
        usage = shutil.disk_usage(path.parent if str(path.parent) else ".")
    except OSError:
        return None
    return usage.free if usage.total > 0 else None


def _size_text(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _disk_full_error(path: Path, fix: str = "free some space and rerun the same command to resume") -> UserError:
    free = _free_bytes(path)
    left = "free space unknown" if free is None else f"{_size_text(free)} free"
    return UserError(f"{path}: the disk is full ({left}); {fix}")


_TEMP_TAG = ".tmp-"


def _temp_path(path: Path) -> Path:
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


def _remove_dead_temps(path: Path) -> None:
    """Delete the temporaries of ``path`` left by processes that died (those of live ones are theirs)."""
    prefix = f".{path.name}{_TEMP_TAG}"
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent if str(path.parent) else "."):
            pid = entry.name[len(prefix):]
            if entry.name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _publish(tmp: Path, path: Path, *, overwrite: bool) -> None:
    """Give the finished file ``tmp`` its name ``path`` in one step; without ``overwrite`` never replace a
    file that appeared meanwhile (a hard link fails on an existing name, where a rename would clobber it)."""
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
    """A temporary path next to ``path`` to build a file under: when the block ends without error it is
    renamed to ``path`` (an existing ``path`` is refused unless ``overwrite``), otherwise deleted. A file
    already at ``path`` stays untouched until the new one is complete."""
    path = Path(path)
    _remove_dead_temps(path)
    tmp = _temp_path(path)
    try:
        yield tmp
        _publish(tmp, path, overwrite=overwrite)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (the same inode, or the same resolved path if either is missing)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


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
    """The file as read-only bytes with its superblock's "open for write" flags cleared and its end
    of file the larger of the real and the stored one (the missing tail of a truncated file reads as zeros).

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
def _open_read(path: Path) -> Iterator[h5py.File]:
    """Open for reading: with SWMR while a writer is attached (live reading), else plainly (SWMR
    reads retry a damaged block for ever); a file whose writer died (flags left set) or that was
    truncated is read through ``_ReadView``. An HDF5 error while reading becomes a UserError."""
    live = writer_attached(path)
    try:
        f = _open_h5(path, "r", swmr=True) if live else _open_h5(path, "r")
    except UserError as e:
        if not any(s in str(e) for s in ("open for", "SWMR", "truncated file")):
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
            raise UserError(f"{path}: cannot open the HDF5 file ({_first_line(err)}); it was truncated or "
                            "corrupted — restore it from a copy") from None
        try:
            with _damage_is_user_error(path), f:
                yield f
        finally:
            raw.close()
        return
    with _damage_is_user_error(path), f:
        yield f


@contextlib.contextmanager
def _damage_is_user_error(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise UserError(f"{path}: cannot read the file ({_first_line(e)}); it was truncated or corrupted — "
                        "restore it from a copy") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]


def _truncation(path: Path) -> tuple[int, int] | None:
    """(real size, stored end of file) when a file with no writer attached is shorter than its superblock
    (version 2/3) records; a killed SWMR writer leaves a stored end that is short, never long."""
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


def _check_kind(f: h5py.File, path: Path, want: str | None) -> str:
    kind = f.attrs.get("lossatlas_format")
    if kind not in ("run", "results"):
        raise UserError(f"{path}: an HDF5 file but not a lossatlas file (no lossatlas_format attribute); "
                        "pass a run file written by lossatlas (see `lossatlas import`)")
    version = int(f.attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: written by a newer lossatlas (format_version {version}, this one reads "
                        f"{FORMAT_VERSION}); upgrade lossatlas (pip install -U lossatlas)")
    if want is not None and kind != want:
        hint = "pass the run file, not its .results.h5" if want == "run" else "pass a results file"
        raise UserError(f"{path}: a lossatlas {kind} file, not a {want} file; {hint}")
    return kind


def file_kind(path: str | Path) -> str:
    """``"run"`` or ``"results"``: what lossatlas file ``path`` is; UserError for anything else."""
    path = Path(path)
    with _open_read(path) as f:
        return _check_kind(f, path, None)


def default_results_path(run_path: str | Path) -> Path:
    """The results file next to a run: ``run.h5`` -> ``run.results.h5``."""
    run_path = Path(run_path)
    if run_path.suffix == ".h5":
        return run_path.with_suffix(".results.h5")
    return run_path.with_name(run_path.name + ".results.h5")


# -- the writer's lock sidecar ----------------------------------------------------------------------
def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def writer_attached(path: str | Path) -> bool:
    """Whether a live ``RunWriter`` holds ``path`` (its ``.lock`` sidecar is flock-ed)."""
    try:
        fd = os.open(_lock_path(Path(path)), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we got
    return False


class _WriterLock:
    """An exclusive flock on ``<file>.lock``, released by the kernel if the writer dies."""

    def __init__(self, path: Path) -> None:
        self.path = _lock_path(path)
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)


# -- run file -------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """One stored checkpoint: parameters, buffers, optional optimizer state and scalar attrs."""

    step: int
    params: dict[str, Tensor]
    buffers: dict[str, Tensor] = field(default_factory=dict)
    optimizer_state: dict[str, dict[str, Tensor]] | None = None
    attrs: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Tensor]:
        """Parameters and buffers in one dict, keyed as in the model's ``state_dict``."""
        return {**self.params, **self.buffers}


class RunWriter:
    """Write a run file: checkpoints (bit-exact tensors) and a per-step log, readable while written.

    Refuses an existing ``path`` unless ``overwrite=True``. Log rows are buffered and flushed every
    ``flush_every`` rows, on each checkpoint, on ``flush()`` and on ``close()``. With
    ``swmr=False`` the file is written without SWMR (for file systems without it): no live
    reading and no crash guarantee. ``log_names`` declares log columns up front, so that their
    first appearance does not leave SWMR (the one moment a kill could damage the file).
    """

    def __init__(self, path: str | Path, *, model_spec: dict | None, data_spec: dict | None = None,
                 loss: str | None = None, optimizer: dict | None = None, attrs: dict | None = None,
                 overwrite: bool = False, swmr: bool = True, flush_every: int = 100,
                 log_names: Sequence[str] = ()) -> None:
        self.path = Path(path)
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be a positive int, got {flush_every!r}")
        header = {"model": _dumps(model_spec, "model_spec"), "data": _dumps(data_spec, "data_spec"),
                  "optimizer": _dumps(optimizer, "optimizer"), "attrs": _dumps(attrs or {}, "attrs")}
        # factory specs signed with this user's key: reading them back needs no --trust-factory
        header["spec_signatures"] = trust.sign_specs({"model": header["model"], "data": header["data"]})
        if self.path.is_dir():
            raise UserError(f"{self.path}: is a directory; pass a file path for the run")
        if self.path.exists() and not overwrite:
            raise UserError(f"{self.path}: already exists; pass --force (overwrite=True) to replace it")
        self.swmr = swmr
        self.flush_every = flush_every
        self._lock = _WriterLock(self.path)
        _remove_dead_temps(self.path)
        tmp, f = _temp_path(self.path), None
        try:  # built under a temporary name, then renamed: a kill here never leaves a stub at ``path``
            f = _open_h5(tmp, "w", libver="latest")
            f.attrs.update(lossatlas_format="run", format_version=FORMAT_VERSION, loss=loss or "",
                           created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                           lossatlas_version=__version__, run_id=uuid.uuid4().hex, **header)
            f.attrs["checksums"] = _DIGESTS  # every checkpoint tensor row has its checksum there
            for g in ("checkpoints/params", "checkpoints/buffers", "checkpoints/optimizer",
                      "checkpoints/attrs", "log"):
                f.create_group(g, track_order=True)
            self._grow_dataset(f, "checkpoints/step", np.int64, fill=-1)
            self._grow_dataset(f, "checkpoints/has_optimizer", np.uint8, fill=0)
            self._grow_dataset(f, "log/step", np.int64, fill=-1)
            for n in log_names:  # declared up front: no SWMR restart when they first appear
                if n == "step":
                    raise ValueError("'step' is reserved in the log")
                self._grow_dataset(f["log"], _escape(n), np.float64, fill=np.nan).attrs["first_row"] = 0
            f.flush()
            _publish(tmp, self.path, overwrite=overwrite)  # the open handle follows the rename (POSIX)
            if swmr:
                f.swmr_mode = True
        except BaseException as e:
            if f is not None:
                with contextlib.suppress(Exception):
                    f.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._lock.release()
            if _disk_full(e):
                raise _disk_full_error(self.path) from None
            raise
        self._f: h5py.File | None = f
        self._digest_cols: dict[str, int] = {}  # tensor dataset -> its column in /checkpoints/digest
        self._n_ckpt = 0
        self._n_log = 0
        self._steps: set[int] = set()
        self._rows: list[tuple[int, dict[str, float]]] = []

    @staticmethod
    def _grow_dataset(f: h5py.Group, name: str, dtype: Any, fill: Any) -> h5py.Dataset:
        return f.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(1024,), dtype=dtype, fillvalue=fill)

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def _file(self) -> h5py.File:
        if self._f is None:
            raise ValueError(f"{self.path}: the RunWriter is closed")
        return self._f

    @contextlib.contextmanager
    def _structure(self) -> Iterator[h5py.File]:
        """Leave SWMR briefly to create datasets: close, reopen (waiting out readers), restart SWMR."""
        if not self.swmr:
            yield self._file
            return
        self._file.close()
        self._f = None
        self._f = _open_h5(self.path, "r+", libver="latest")
        yield self._f
        self._f.swmr_mode = True

    def write_checkpoint(self, step: int, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None = None,
                         optimizer_state: Mapping[str, Mapping[str, Tensor]] | None = None,
                         attrs: Mapping[str, float] | None = None) -> None:
        """Append the checkpoint at ``step`` (tensors bit for bit) and flush it to disk."""
        f = self._file
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
        step = int(step)
        if step in self._steps:
            raise ValueError(f"{self.path}: a checkpoint at step {step} is already written")
        rows: dict[str, tuple[np.ndarray, str]] = {}  # dataset path -> (array, torch dtype)
        for group, tensors in (("params", params), ("buffers", buffers or {})):
            for k, v in tensors.items():
                rows[f"checkpoints/{group}/{_escape(k)}"] = _tensor_to_numpy(v, f"{group} {k!r}")
        for p, states in (optimizer_state or {}).items():
            if not isinstance(p, str):
                raise ValueError(f"optimizer_state keys must be parameter names (str), got {p!r}")
            for s, v in states.items():
                rows[f"checkpoints/optimizer/{_escape(p)}/{_escape(s)}"] = _tensor_to_numpy(v, f"optimizer {p!r} {s!r}")
        scalars: dict[str, float] = {}
        for k, v in (attrs or {}).items():
            try:
                scalars[f"checkpoints/attrs/{_escape(k)}"] = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"checkpoint attr {k!r} must be a number, got {v!r}") from None
        self._check_rows(f, rows, optimizer_state is not None)
        free = _free_bytes(self.path)
        need = sum(arr.nbytes for arr, _ in rows.values()) + _DISK_MARGIN
        if free is not None and free < need:  # refuse before HDF5 meets a full disk: it crashes on one
            raise _disk_full_error(self.path, f"the checkpoint needs {_size_text(need)}; free some space (the "
                                              "checkpoints written so far are intact) and train again")
        self._flush_log()
        new = [p for p in (*rows, *scalars) if p not in self._file]
        if new:
            with self._structure() as f:
                for p in new:
                    if p in scalars:
                        ds = self._grow_dataset(f, p, np.float64, fill=np.nan)
                    else:
                        arr, dtype_name = rows[p]
                        ds = f.create_dataset(p, shape=(0, *arr.shape), maxshape=(None, *(d or None for d in arr.shape)),
                                              chunks=_row_chunks(arr.shape, arr.dtype.itemsize), dtype=arr.dtype)
                        ds.attrs["torch_dtype"] = dtype_name
                        ds.attrs["digest_column"] = self._digest_cols[p] = len(self._digest_cols)
                    ds.attrs["first_row"] = self._n_ckpt
                if self._digest_cols:
                    self._digest_dataset(f).resize(len(self._digest_cols), axis=1)
        f, k = self._file, self._n_ckpt
        digests = np.zeros(len(self._digest_cols), np.uint64)
        for p, (arr, _) in rows.items():
            digests[self._digest_cols[p]] = _digest(arr)
            ds = f[p]
            ds.resize(k + 1, axis=0)
            ds[k] = arr
            ds.flush()
        if self._digest_cols:  # the checksums too land before the commit
            self._append_row(f[_DIGESTS], k, digests)
        for name in f["checkpoints/attrs"]:
            ds = f["checkpoints/attrs"][name]
            ds.resize((k + 1,))
            ds[k] = scalars.get(f"checkpoints/attrs/{name}", np.nan)
            ds.flush()
        self._append(f["checkpoints/has_optimizer"], k, [optimizer_state is not None])
        self._append(f["checkpoints/step"], k, [step])  # the commit
        self._n_ckpt += 1
        self._steps.add(step)

    def _check_rows(self, f: h5py.File, rows: dict[str, tuple[np.ndarray, str]], has_optimizer: bool) -> None:
        """Refuse, before writing anything, a tensor whose shape/dtype changed or a key that vanished."""
        for p, (arr, dtype_name) in rows.items():
            if p in f:
                ds = f[p]
                if ds.shape[1:] != arr.shape or ds.attrs["torch_dtype"] != dtype_name:
                    raise ValueError(f"{_unescape(p)}: shape {tuple(arr.shape)} dtype {dtype_name} differs from "
                                     f"earlier checkpoints ({ds.shape[1:]}, {ds.attrs['torch_dtype']}); "
                                     "write a new run for a different model")
        groups = ["checkpoints/params", "checkpoints/buffers"]
        if has_optimizer:
            groups += [f"checkpoints/optimizer/{p}" for p in f["checkpoints/optimizer"]]
        for g in groups:
            for name in f[g]:
                if f"{g}/{name}" not in rows:
                    raise ValueError(f"{_unescape(g)}/{_unescape(name)} is missing from this checkpoint but "
                                     "present in earlier ones; every checkpoint must carry the same keys")

    def _digest_dataset(self, f: h5py.File) -> h5py.Dataset:
        """``/checkpoints/digest`` (K, T) uint64: row k, column ``digest_column`` of a tensor dataset holds
        the 64-bit BLAKE2b of that tensor's row k (0 where the row does not carry the tensor)."""
        if _DIGESTS in f:
            return f[_DIGESTS]
        cols = 1 << max(3, min(8, (len(self._digest_cols) - 1).bit_length()))  # 8..256 columns per chunk
        return f.create_dataset(_DIGESTS, shape=(self._n_ckpt, 0), maxshape=(None, None), chunks=(16, cols),
                                dtype=np.uint64, fillvalue=0)

    @staticmethod
    def _append_row(ds: h5py.Dataset, k: int, row: np.ndarray) -> None:
        ds.resize(k + 1, axis=0)
        ds[k] = row
        ds.flush()

    @staticmethod
    def _append(ds: h5py.Dataset, start: int, values: list) -> None:
        ds.resize((start + len(values),))
        ds[start:] = values
        ds.flush()

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Buffer one log row (NaN is kept: divergence is worth recording); flushed in batches."""
        self._file
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"log step must be a non-negative int, got {step!r}")
        row = {}
        for k, v in values.items():
            if k == "step":
                raise ValueError("'step' is reserved in the log; pass the step as the first argument")
            try:
                row[_escape(k)] = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"log value {k!r} must be a number, got {v!r}") from None
        self._rows.append((int(step), row))
        if len(self._rows) >= self.flush_every:
            self._flush_log()

    def _flush_log(self) -> None:
        if not self._rows:
            return
        names = list(dict.fromkeys(k for _, row in self._rows for k in row))
        cols = {n: np.array([row.get(n, np.nan) for _, row in self._rows], dtype=np.float64) for n in names}
        steps = [s for s, _ in self._rows]
        self._rows = []
        self._write_columns(steps, cols)

    def log_block(self, steps: Any, columns: Mapping[str, Any]) -> None:
        """Append many log rows at once: ``steps`` (T,) and ``columns[name]`` (T,) float (NaN: not logged).

        The bulk path of ``log`` for a caller that buffers its own telemetry (the Recorder).
        """
        steps = [int(s) for s in np.asarray(steps).reshape(-1)]
        if not steps:
            return
        if any(s < 0 for s in steps):
            raise ValueError("log steps must be non-negative ints")
        cols = {}
        for name, values in columns.items():
            arr = np.asarray(values, dtype=np.float64).reshape(-1)
            if arr.shape[0] != len(steps):
                raise ValueError(f"log column {name!r} has {arr.shape[0]} rows for {len(steps)} steps")
            cols[_escape(name)] = arr
        self._file
        self._flush_log()  # rows logged one by one come first
        self._write_columns(steps, cols)

    def _write_columns(self, steps: list[int], cols: Mapping[str, np.ndarray]) -> None:
        new = [n for n in cols if n not in self._file["log"]]
        if new:
            with self._structure() as f:
                for n in new:
                    ds = self._grow_dataset(f["log"], n, np.float64, fill=np.nan)
                    ds.attrs["first_row"] = self._n_log
        log, n = self._file["log"], self._n_log
        for name in log:
            if name != "step":
                self._append(log[name], n, cols[name] if name in cols else np.full(len(steps), np.nan))
        self._append(log["step"], n, steps)  # the commit
        self._n_log += len(steps)

    def flush(self) -> None:
        """Write buffered log rows and flush the file."""
        self._flush_log()
        self._file.flush()

    def close(self) -> None:
        """Flush, close the file and release the writer lock (idempotent)."""
        if self._f is None:
            return
        try:
            self._flush_log()
        finally:
            self._f.close()
            self._f = None
            self._lock.release()


def _json_attr(attrs: Any, name: str, default: str, path: Path) -> Any:
    """The JSON value of a run-file attribute; UserError naming the attribute when it is not JSON."""
    try:
        return json.loads(attrs.get(name, default))
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: the run file's {name!r} attribute is not valid JSON ({exc}); the file is damaged "
                        "or was written by another tool; re-create it (lossatlas import / train)") from None


class _Damaged(Exception):
    """A checkpoint tensor that fails its checksum or cannot be read (``tensor`` None: not one tensor)."""

    def __init__(self, tensor: str | None, reason: str) -> None:
        super().__init__(reason)
        self.tensor, self.reason = tensor, reason


class RunReader:
    """Read a run file, also while a writer is attached: every call reopens it and sees new rows.

    A truncated file (shorter than its superblock says, no writer attached) is refused, naming its first
    damaged checkpoint, unless ``damaged_ok`` (to ``verify`` it): its log cannot be trusted then, and only
    checkpoints that pass their checksums are read.
    """

    def __init__(self, path: str | Path, *, damaged_ok: bool = False) -> None:
        self.path = Path(path)
        with self._open() as f:
            _check_kind(f, self.path, "run")
            a = f.attrs
            # StoredSpec dicts: they know their file and whether this user signed them (trust.py)
            signatures = a.get("spec_signatures")
            self.model_spec: dict | None = trust.stored_spec(_json_attr(a, "model", "null", self.path), signatures,
                                                             role="model", source=self.path)
            self.data_spec: dict | None = trust.stored_spec(_json_attr(a, "data", "null", self.path), signatures,
                                                            role="data", source=self.path)
            self.optimizer: dict | None = _json_attr(a, "optimizer", "null", self.path)
            self.attrs: dict = _json_attr(a, "attrs", "{}", self.path)
            self.loss: str | None = str(a.get("loss", "")) or None
            self.created_at: str = str(a.get("created_at", ""))
            self.lossatlas_version: str = str(a.get("lossatlas_version", ""))
            self._fingerprint = hashlib.sha256(f"{a.get('run_id', '')}|{self.created_at}".encode()).hexdigest()[:16]
        # (real size, size the superblock records) of a file cut short, else None
        self.truncated: tuple[int, int] | None = _truncation(self.path)
        if self.truncated is not None and not damaged_ok:
            raise self._truncated_error()

    def _truncated_error(self) -> UserError:
        """Name the first checkpoint of the damaged tail (truncation cuts the last-written rows)."""
        real, stored = self.truncated or (0, 0)
        first: tuple[int, _Damaged] | None = None
        with self._open() as f:
            steps = self._committed(f["checkpoints/step"]).tolist()
            for row in range(len(steps) - 1, -1, -1):
                try:
                    self._read_checkpoint(f, row, steps[row], optimizer_state=True)
                    break
                except _Damaged as e:
                    first = (steps[row], e)
        cut = f"the file is truncated ({real} of {stored} bytes)"
        if first is None:
            return UserError(f"{self.path}: {cut}: its checkpoints pass their checksums but its log is cut off; "
                             "restore it from a copy")
        step, e = first
        what = f"tensor {e.tensor!r} {e.reason}" if e.tensor else e.reason
        return UserError(f"{self.path}: {cut}: checkpoint at step {step} is damaged ({what}), and every later one; "
                         f"restore it from a copy (`lossatlas info {self.path} --verify` lists the intact checkpoints)")

    def _refuse_truncated(self, what: str) -> None:
        if self.truncated is not None:
            real, stored = self.truncated
            raise UserError(f"{self.path}: the file is truncated ({real} of {stored} bytes), so its {what} cannot "
                            "be trusted; restore it from a copy")

    def _open(self) -> contextlib.AbstractContextManager[h5py.File]:
        return _open_read(self.path)

    def __enter__(self) -> "RunReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release: the file is opened per call."""

    @staticmethod
    def _committed(ds: h5py.Dataset) -> np.ndarray:
        steps = ds[:]
        bad = np.flatnonzero(steps < 0)  # a row grown but not yet written
        return steps[: bad[0]] if bad.size else steps

    def steps(self) -> list[int]:
        """The checkpoint steps, in the order they were written."""
        with self._open() as f:
            return self._committed(f["checkpoints/step"]).tolist()

    def _row(self, f: h5py.File, step: int) -> int:
        steps = self._committed(f["checkpoints/step"])
        hits = np.flatnonzero(steps == step)
        if not hits.size:
            near = sorted(steps.tolist(), key=lambda s: (abs(s - step), s))[:6]
            listed = ", ".join(map(str, sorted(near))) if near else "none (the run has no checkpoints yet)"
            raise UserError(f"{self.path}: no checkpoint at step {step}; nearest steps: {listed}")
        return int(hits[-1])

    @staticmethod
    def _tensors(group: h5py.Group, row: int, digests: np.ndarray | None, prefix: str = "") -> dict[str, Tensor]:
        """The tensors of row ``row`` in ``group``, each checked against its checksum when ``digests`` is given."""
        out = {}
        for name, ds in group.items():
            what = prefix + _unescape(name)
            if ds is None:  # h5py gives None for an object it cannot open
                raise _Damaged(what, "cannot be read (its object header is damaged)")
            try:
                if not ds.attrs.get("first_row", 0) <= row < ds.shape[0]:
                    continue
                arr = np.asarray(ds[row])
                col = ds.attrs.get("digest_column") if digests is not None else None
            except OSError as e:
                raise _Damaged(what, f"cannot be read: {_first_line(e)}") from None
            if digests is not None and (col is None or col >= digests.size or _digest(arr) != int(digests[col])):
                raise _Damaged(what, "fails its checksum")
            out[_unescape(name)] = _numpy_to_tensor(arr, ds.attrs["torch_dtype"])
        return out

    @staticmethod
    def _scalars(group: h5py.Group, row: int) -> dict[str, float]:
        out = {}
        for name, ds in group.items():
            if ds is None:
                raise _Damaged(None, f"its attribute {_unescape(name)!r} cannot be read")
            if row < ds.shape[0] and not math.isnan(v := float(ds[row])):
                out[_unescape(name)] = v
        return out

    @staticmethod
    def _digests(f: h5py.File, row: int) -> np.ndarray | None:
        """The checksums of row ``row`` (None for a file written before checksums)."""
        if "checksums" not in f.attrs and _DIGESTS not in f:
            return None
        try:
            dg = f[_DIGESTS]
            return np.asarray(dg[row]) if row < dg.shape[0] else np.zeros(dg.shape[1], np.uint64)
        except (OSError, KeyError) as e:
            raise _Damaged("checksums", f"cannot be read: {_first_line(e)}") from None

    def _read_checkpoint(self, f: h5py.File, row: int, step: int, optimizer_state: bool) -> Checkpoint:
        try:
            digests = self._digests(f, row)
            ck = f["checkpoints"]
            params = self._tensors(ck["params"], row, digests)
            buffers = self._tensors(ck["buffers"], row, digests)
            opt = None
            if optimizer_state and ck["has_optimizer"][row]:
                opt = {_unescape(p): self._tensors(g, row, digests, f"optimizer/{_unescape(p)}/")
                       for p, g in ck["optimizer"].items()}
                opt = {p: s for p, s in opt.items() if s}
            return Checkpoint(step=int(step), params=params, buffers=buffers, optimizer_state=opt,
                              attrs=self._scalars(ck["attrs"], row))
        except (OSError, KeyError) as e:  # a group or a scalar that HDF5 cannot read
            raise _Damaged(None, f"cannot be read: {_first_line(e)}") from None

    def _damaged(self, step: int, e: "_Damaged") -> UserError:
        what = f"tensor {e.tensor!r} {e.reason}" if e.tensor else e.reason
        return UserError(f"{self.path}: checkpoint at step {step} is damaged ({what}); the file was truncated "
                         "or corrupted — restore it from a copy")

    def checkpoint(self, step: int, *, optimizer_state: bool = False) -> Checkpoint:
        """The checkpoint at ``step``; its optimizer state too if asked (None when not stored). Every tensor is
        checked against its checksum: a damaged one raises UserError naming the step and the tensor."""
        with self._open() as f:
            row = self._row(f, step)
            try:
                return self._read_checkpoint(f, row, step, optimizer_state)
            except _Damaged as e:
                raise self._damaged(step, e) from None

    def verify(self) -> dict[int, str]:
        """Read every checkpoint (optimizer state included) and check its checksums: step -> "ok",
        "damaged: <tensor>" or "unverified (no checksums)" (a file written before checksums existed)."""
        out = {}
        with self._open() as f:
            steps = self._committed(f["checkpoints/step"]).tolist()
            verified = "checksums" in f.attrs or _DIGESTS in f
            for row, step in enumerate(steps):
                try:
                    self._read_checkpoint(f, row, step, optimizer_state=True)
                except _Damaged as e:
                    out[step] = f"damaged: {e.tensor or e.reason}"
                else:
                    out[step] = "ok" if verified else "unverified (no checksums)"
        return out

    def checkpoint_attrs(self, step: int) -> dict[str, float]:
        """The scalars stored with the checkpoint at ``step`` (``step`` itself, epoch, lr, ...)."""
        with self._open() as f:
            row = self._row(f, step)
            try:
                return {"step": int(step), **self._scalars(f["checkpoints/attrs"], row)}
            except _Damaged as e:
                raise self._damaged(step, e) from None

    def log_names(self) -> list[str]:
        """The names in the per-step log, in order of first appearance (without "step")."""
        self._refuse_truncated("log")
        with self._open() as f:
            return [_unescape(n) for n in f["log"] if n != "step"]

    def log(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """The per-step log as ``{"step": (N,) int64, name: (N,) float64}`` (NaN where not logged)."""
        self._refuse_truncated("log")
        with self._open() as f:
            log = f["log"]
            steps = self._committed(log["step"])
            known = [_unescape(n) for n in log if n != "step"]
            unknown = [n for n in (names or []) if n not in known]
            if unknown:
                raise UserError(f"{self.path}: no log named {', '.join(map(repr, unknown))}; "
                                f"logged: {', '.join(known) or 'nothing yet'}")
            out = {"step": steps}
            for name in known if names is None else names:
                col = np.full(steps.shape, np.nan)
                data = log[_escape(name)][: steps.size]
                col[: data.size] = data
                out[name] = col
            return out

    def writer_attached(self) -> bool:
        """Whether a live writer is still adding to this run (False after close or a crash)."""
        return writer_attached(self.path)

    def size_bytes(self) -> int:
        """The file's size on disk in bytes."""
        return self.path.stat().st_size

    def fingerprint(self) -> str:
        """A short hash identifying this run (random run id + creation time); it never changes."""
        return self._fingerprint


def open_run(path: str | Path) -> RunReader:
    """A ``RunReader`` for ``path`` (UserError if it is not a lossatlas run file)."""
    return RunReader(path)


# -- results file -----------------------------------------------------------------------------------
def _step_name(step: int | None) -> str:
    if step is None:
        return "none"
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"a Result's step must be a non-negative int or None, got {step!r}")
    return f"{int(step):010d}"


def _write_array(g: h5py.Group, name: str, value: Any, role: str) -> h5py.Dataset:
    arr = np.asarray(value)
    kind = arr.dtype.kind
    if kind == "b":
        ds = g.create_dataset(name, data=arr.astype(np.uint8))
        ds.attrs["dtype"] = "bool"
    elif kind == "U" or (kind == "O" and all(isinstance(x, str) for x in arr.ravel().tolist())):
        ds = g.create_dataset(name, data=arr.astype(object), dtype=h5py.string_dtype("utf-8"))
        ds.attrs["dtype"] = "str"
    elif kind in "iufcS":
        ds = g.create_dataset(name, data=arr)
    else:
        raise ValueError(f"{role} {name!r}: cannot store an array of dtype {arr.dtype}; use numbers, bools or strings")
    ds.attrs["role"] = role
    return ds


def _read_array(ds: h5py.Dataset) -> np.ndarray:
    kind = ds.attrs.get("dtype", "")
    if kind == "bool":
        return np.asarray(ds[()]).astype(bool)
    if kind == "str":
        return np.asarray(ds.asstr()[()], dtype=str)
    return np.asarray(ds[()])


_ENTRY_ATTRS = ("config", "meta", "dims", "data_fingerprint", "lossatlas_version", "elapsed_s", "status", "written_at")


def _array_digest(arr: np.ndarray) -> int:
    """The checksum of a stored value or coord: its dtype, shape and bytes as ``_read_array`` gives them."""
    head = np.frombuffer(f"{arr.dtype.str}{arr.shape}".encode(), np.uint8)
    return _digest(np.concatenate([head, np.frombuffer(arr.tobytes(), np.uint8)]))


def _entry_digest(attrs: Mapping[str, Any], names: Sequence[str]) -> int:
    """The checksum of an entry's attributes and of the names of its datasets."""
    norm = {k: float(attrs[k]) if isinstance(attrs[k], (float, np.floating)) else str(attrs[k]) for k in _ENTRY_ATTRS}
    text = json.dumps({"attrs": norm, "datasets": sorted(names)}, sort_keys=True)
    return _digest(np.frombuffer(text.encode(), np.uint8))


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive flock on ``<path>.lock`` around one change of ``path``, by any process. The sidecar
    is removed on release; a waiter that locked a removed sidecar retries on the current one."""
    lock = _lock_path(path)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if _disk_full(e):
                raise _disk_full_error(path) from None
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


class ResultsStore:
    """The results file of a run: one labelled group per (probe, config key, step).

    ``mode`` is ``"r"`` (read only; the file must exist) or ``"a"`` (create if missing). A file
    recorded for another run (a different ``run_fingerprint``) is refused.

    Every change is copy-on-write under an exclusive lock (``<file>.lock``): the file is copied into
    memory, changed, written to a temporary next to it, synced and renamed over the original. A
    failure (a full disk, a kill) leaves the original untouched; writers in several processes all
    land. Creation links a finished file into place, so a killed process never leaves a stub; an
    existing file that is not a readable results file is refused, never overwritten. Every dataset
    carries ``digest`` (the checksum of its bytes) and every entry ``digest`` (of its attributes):
    reading checks them.
    """

    def __init__(self, path: str | Path, *, run_fingerprint: str | None = None, mode: str = "a") -> None:
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        self.path, self.mode = Path(path), mode
        self._fingerprint = run_fingerprint or ""
        if self.path.is_dir():
            raise UserError(f"{self.path}: is a directory; pass a results file path")
        if not self.path.exists():
            if mode == "r":
                raise UserError(f"{self.path}: no such results file; run a probe first (e.g. `lossatlas hessian`)")
            with _exclusive(self.path):
                _remove_dead_temps(self.path)
                if not self.path.exists():
                    self._create()
                    return
        stored = self._stored_fingerprint()
        if run_fingerprint and stored and stored != run_fingerprint:
            raise UserError(f"{self.path}: holds results of another run (fingerprint {stored}, this run "
                            f"{run_fingerprint}); pass another results path or delete the file")
        if run_fingerprint and not stored and mode == "a":
            self._change(lambda f: f.attrs.__setitem__("run_fingerprint", run_fingerprint))

    def _stored_fingerprint(self) -> str:
        """The header's run fingerprint. An existing file that is not a readable results file is refused,
        saying what to do; it is never overwritten."""
        try:
            f = _open_h5(self.path, "r")
        except UserError as e:
            if "another process" in str(e):
                raise
            reason = ("it is truncated, as an interrupted creation or copy leaves it" if "truncated file" in str(e)
                      else str(e).removeprefix(f"{self.path}: ").split(";")[0])
            raise self._unreadable(reason) from None
        with f:
            if "lossatlas_format" not in f.attrs and not len(f):
                raise self._unreadable("an empty HDF5 file: its creation never finished")
            _check_kind(f, self.path, "results")
            return str(f.attrs.get("run_fingerprint", ""))

    def _unreadable(self, reason: str) -> UserError:
        return UserError(f"{self.path}: exists but is not a readable results file ({reason}); move it aside "
                         f"(mv {self.path} {self.path}.broken) and rerun to start a new one, or pass another "
                         "--results path")

    def _create(self) -> None:
        """Write the header under a temporary name and link it into place (called under the lock)."""
        image = io.BytesIO()
        with h5py.File(image, "w") as f:
            f.attrs.update(lossatlas_format="results", format_version=FORMAT_VERSION,
                           run_fingerprint=self._fingerprint, lossatlas_version=__version__)
        self._install(image.getvalue(), overwrite=False)

    def _change(self, change: Any) -> None:
        """Apply ``change(h5py.File)`` to a copy and rename the copy over the file, under the lock; on any
        failure the file is untouched. The copy is changed in memory and then written with plain file I/O,
        so HDF5 itself never meets a full disk (it cannot close a file it failed to flush)."""
        with _exclusive(self.path):
            _remove_dead_temps(self.path)
            if not self.path.exists():  # deleted by hand since it was opened
                self._create()
            try:
                image = io.BytesIO(self.path.read_bytes())
                f = h5py.File(image, "r+")
                try:
                    change(f)
                finally:
                    f.close()
            except OSError as e:
                if _disk_full(e):  # memory and HDF5 can report ENOSPC too
                    raise _disk_full_error(self.path) from None
                raise
            self._install(image.getvalue(), overwrite=True)

    def _install(self, data: bytes, *, overwrite: bool) -> None:
        """Write ``data`` to a temporary next to the file, sync it, and give it the file's name."""
        tmp = _temp_path(self.path)
        mode = self.path.stat().st_mode & 0o777 if overwrite else 0o666  # 0o666 less the umask
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            try:
                if overwrite:
                    os.fchmod(fd, mode)  # the original's mode, whatever the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            _publish(tmp, self.path, overwrite=overwrite)
        except BaseException as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if _disk_full(e):
                raise _disk_full_error(self.path) from None
            raise

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release: the file is opened per call, so it is consistent between calls."""

    def write(self, result: Result, *, key: str, status: str = "complete", data_fingerprint: str = "",
              elapsed_s: float = 0.0) -> None:
        """Store ``result`` under ``/<probe>/<key>/<step>``, replacing an earlier entry there."""
        if self.mode != "a":
            raise ValueError(f"{self.path}: opened read-only (mode 'r'); open with mode 'a' to write")
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        clash = set(result.values) & set(result.coords)
        if clash:
            raise ValueError(f"Result {result.probe!r}: {sorted(clash)} are both values and coords; rename one")
        for name in result.values:
            for axis, dim in enumerate(result.dims[name]):
                c = result.coords.get(dim)
                if c is not None and (c.ndim != 1 or c.shape[0] != result.values[name].shape[axis]):
                    raise ValueError(f"Result {result.probe!r}: coord {dim!r} has shape {c.shape} but axis {axis} "
                                     f"of {name!r} has {result.values[name].shape[axis]} points")
        attrs = {"config": _dumps(result.config, "config"), "meta": _dumps(result.meta, "meta"),
                 "dims": _dumps({k: list(v) for k, v in result.dims.items()}, "dims"),
                 "data_fingerprint": data_fingerprint, "lossatlas_version": __version__,
                 "elapsed_s": float(elapsed_s), "status": status, "written_at": time.time()}
        name = _step_name(result.step)

        def change(f: h5py.File) -> None:
            parent = f.require_group(_escape(result.probe)).require_group(_escape(key))
            if name in parent:
                del parent[name]
            g = parent.create_group(name, track_order=True)
            for c, arr in result.coords.items():
                ds = _write_array(g, _escape(c), arr, "coord")
                if ds.ndim == 1:
                    ds.make_scale(c)
            for v, arr in result.values.items():
                ds = _write_array(g, _escape(v), arr, "value")
                for axis, dim in enumerate(result.dims[v]):
                    ds.dims[axis].label = dim
                    if dim in result.coords:
                        ds.dims[axis].attach_scale(g[_escape(dim)])
            for ds in g.values():
                ds.attrs["digest"] = np.uint64(_array_digest(_read_array(ds)))
            g.attrs.update(attrs)
            g.attrs["digest"] = np.uint64(_entry_digest(attrs, list(g)))

        self._change(change)

    @staticmethod
    def _entry(g: h5py.Group, probe: str, step: int | None) -> tuple[Result, dict]:
        """The entry in group ``g``, its checksums checked (``_Damaged`` names what fails)."""
        if g is None:  # h5py gives None for a group it cannot open
            raise _Damaged(None, "its group cannot be read")
        values, coords = {}, {}
        for n, ds in g.items():
            what = f"dataset {_unescape(n)!r}"
            if ds is None:  # h5py gives None for an object it cannot open
                raise _Damaged(None, f"{what} cannot be read (its object header is damaged)")
            try:
                arr, want, role = _read_array(ds), ds.attrs.get("digest"), ds.attrs.get("role")
            except OSError as e:
                raise _Damaged(None, f"{what} cannot be read: {_first_line(e)}") from None
            if want is not None and _array_digest(arr) != int(want):
                raise _Damaged(None, f"{what} fails its checksum")
            (coords if role == "coord" else values)[_unescape(n)] = arr
        try:
            a = g.attrs
            stored = {k: a[k] for k in _ENTRY_ATTRS}
            want = a.get("digest")
        except (OSError, KeyError) as e:
            raise _Damaged(None, f"its attributes cannot be read: {_first_line(e)}") from None
        if want is not None and _entry_digest(stored, list(g)) != int(want):
            raise _Damaged(None, "its attributes fail their checksum")
        try:
            dims = {k: tuple(v) for k, v in json.loads(stored["dims"]).items()}
            result = Result(probe=probe, config=json.loads(stored["config"]), step=step, values=values,
                            dims=dims, coords=coords, meta=json.loads(stored["meta"]))
        except (ValueError, TypeError, AttributeError) as e:
            raise _Damaged(None, f"its attributes are not valid ({_first_line(e)})") from None
        info = {"status": str(stored["status"]), "data_fingerprint": str(stored["data_fingerprint"]),
                "elapsed_s": float(stored["elapsed_s"]), "version": str(stored["lossatlas_version"]),
                "written_at": float(stored["written_at"])}
        return result, info

    def _damaged(self, probe: str, key: str, step: int | None, e: _Damaged) -> UserError:
        return UserError(f"{self.path}: result {probe}/{key} at step {step if step is not None else 'none'} is "
                         f"damaged ({e.reason}); the file was corrupted — recompute it (rerun the probe with "
                         "--force) or restore the file from a copy")

    def read(self, probe: str, key: str, step: int | None) -> tuple[Result, dict] | None:
        """``(result, info)`` stored for (probe, key, step), or None; info has status, data_fingerprint,
        elapsed_s, version. Its checksums are checked: a damaged entry raises UserError naming it."""
        path = f"{_escape(probe)}/{_escape(key)}/{_step_name(step)}"
        with _damage_is_user_error(self.path), _open_h5(self.path, "r") as f:
            if path not in f:
                return None
            try:
                return self._entry(f[path], probe, step)
            except _Damaged as e:
                raise self._damaged(probe, key, step, e) from None

    def _groups(self, f: h5py.File, probe: str | None = None) -> Iterator[tuple[str, str, int | None, h5py.Group]]:
        for p, pg in f.items():
            if probe is not None and _unescape(p) != probe:
                continue
            for k, kg in pg.items():
                for s, g in kg.items():
                    if not s.startswith("."):  # a temporary group of an interrupted write (older files)
                        yield _unescape(p), _unescape(k), None if s == "none" else int(s), g

    def entries(self, probe: str | None = None) -> list[dict]:
        """Every stored entry (of ``probe`` if given): probe, key, step, status, config, data_fingerprint."""
        out = []
        with _damage_is_user_error(self.path), _open_h5(self.path, "r") as f:
            for p, k, s, g in self._groups(f, probe):
                try:
                    a = g.attrs
                    out.append({"probe": p, "key": k, "step": s, "status": str(a["status"]),
                                "config": json.loads(a["config"]), "data_fingerprint": str(a["data_fingerprint"]),
                                "elapsed_s": float(a["elapsed_s"]), "written_at": float(a["written_at"])})
                except (KeyError, ValueError, OSError, AttributeError) as e:
                    damage = _Damaged(None, f"its attributes cannot be read: {_first_line(e)}")
                    raise self._damaged(p, k, s, damage) from None
        return out

    def verify(self) -> list[dict]:
        """Every entry with its checksums checked: probe, key, step and status ("ok", "damaged: <what>" or
        "unverified (no checksums)" for an entry written before checksums existed)."""
        out = []
        with _damage_is_user_error(self.path), _open_h5(self.path, "r") as f:
            for p, k, s, g in self._groups(f):
                try:
                    self._entry(g, p, s)
                    status = "ok" if "digest" in g.attrs else "unverified (no checksums)"
                except _Damaged as e:
                    status = f"damaged: {e.reason}"
                out.append({"probe": p, "key": k, "step": s, "status": status})
        return out

    def latest(self, probe: str, step: int | None) -> tuple[Result, dict] | None:
        """The most recently written entry for (probe, step), whatever its config key; None if none."""
        found = [e for e in self.entries(probe) if e["step"] == step]
        if not found:
            return None
        newest = max(found, key=lambda e: e["written_at"])
        return self.read(probe, newest["key"], step)
