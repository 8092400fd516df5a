"""The run file and the results file (HDF5): the only module in lossatlas that imports h5py.

Run file (format 1), written by one ``RunWriter`` and read by any number of ``RunReader``s::

    /                             attrs: lossatlas_format="run", format_version=1, model, data,
                                         optimizer, attrs (JSON strings), loss, created_at,
                                         lossatlas_version, run_id
    /checkpoints/step             (K,) int64, fill -1: the commit marker, grown last
    /checkpoints/has_optimizer    (K,) uint8: row k carries optimizer state
    /checkpoints/params/<key>     (K, *shape) in the tensor's dtype, chunk (1, *shape)
    /checkpoints/buffers/<key>    likewise (BatchNorm running stats, num_batches_tracked, ...)
    /checkpoints/optimizer/<param>/<state>   likewise (Adam's exp_avg, exp_avg_sq, step)
    /checkpoints/attrs/<name>     (K,) float64, NaN where a checkpoint did not give it (epoch, lr)
    /log/step                     (N,) int64, fill -1; /log/<name> (N,) float64, NaN where absent

Checkpoint k is the row k of every ``/checkpoints`` dataset; a dataset created after the run
started carries ``first_row`` (the first row it holds). Every tensor dataset carries
``torch_dtype``; h5py has no bfloat16 (nor float8), so those tensors are stored as their raw bits
(uint16 / uint8) and viewed back on reading: every dtype round-trips bit for bit. A '/' in a key
is written as '%2F' (and '%' as '%25'). Nothing is pickled: specs and metadata are JSON.

Live reading and crash safety: the writer runs in HDF5 SWMR mode (libver="latest"). A row is
written and flushed in every dataset before ``/checkpoints/step`` (``/log/step``) grows, so a
reader, or a file left by a writer killed with SIGKILL, shows exactly the checkpoints and log rows
committed before. SWMR cannot create datasets, so when a new name appears (first checkpoint, a
new log name) the writer closes the file, reopens it without SWMR, creates the datasets and
restarts SWMR; HDF5's file locks keep readers out meanwhile (readers retry). Only a kill inside
that short window can damage the file (declare log names up front with ``log_names=`` to keep
windows to the first checkpoint and log flush). Readers open the file per call with ``swmr=True``,
which also opens a file whose writer was killed (plain h5py needs ``swmr=True`` or
``h5clear -s``); a file whose writer died inside a window is read through a view with HDF5's
"open for write" flag cleared (``_FlagsCleared``), never modified.
The writer holds an exclusive ``flock`` on ``<file>.lock`` (holding its pid): the kernel drops it
when the writer dies, so ``writer_attached()`` is False after a kill, and a stale sidecar is
harmless.

Results file (format 1), one group per (probe, config key, step)::

    /                             attrs: lossatlas_format="results", format_version=1, run_fingerprint
    /<probe>/<key>/<step>/        step zero-padded to 10 digits, or "none"; one dataset per value and
                                  coord; a 1-D coord named like a value's axis is that axis' HDF5
                                  dimension scale (every axis is labelled); bool arrays are uint8 and
                                  strings variable-length UTF-8, with attr ``dtype`` saying so
                                  attrs: config, meta, dims (JSON), data_fingerprint, lossatlas_version,
                                         elapsed_s, status ("complete" | "partial"), written_at
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


class _FlagsCleared(io.RawIOBase):
    """The file as read-only bytes with its superblock's "open for write" flags cleared.

    A writer killed while outside SWMR (creating datasets) leaves those flags set and HDF5 then
    refuses every open (``h5clear -s`` would clear them on disk); this view lets a reader open the
    file without modifying it.
    """

    def __init__(self, path: Path) -> None:
        self._f = open(path, "rb")
        head = bytearray(self._f.read(48))
        if head[:8] != b"\x89HDF\r\n\x1a\n" or head[8] not in (2, 3) or head[9] != 8:
            self._f.close()
            raise ValueError("not a version 2/3 superblock with 8-byte offsets")
        head[11] = 0
        head[44:48] = _lookup3(bytes(head[:44])).to_bytes(4, "little")
        self._head = bytes(head)
        self._f.seek(0)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, buf: Any) -> int:
        pos = self._f.tell()
        n = self._f.readinto(buf)
        if pos < len(self._head) and n:
            k = min(n, len(self._head) - pos)
            memoryview(buf)[:k] = self._head[pos:pos + k]
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


@contextlib.contextmanager
def _open_read(path: Path) -> Iterator[h5py.File]:
    """Open for reading (SWMR, so a live or killed SWMR writer is fine); a file whose writer died
    outside SWMR is read through ``_FlagsCleared``."""
    try:
        f = _open_h5(path, "r", swmr=True)
    except UserError as e:
        if "open for" not in str(e) and "SWMR" not in str(e):
            raise
        if writer_attached(path):
            raise UserError(f"{path}: a writer without SWMR holds the file; wait for it to finish") from None
        try:
            raw = _FlagsCleared(path)
        except ValueError:
            raise e from None
        try:
            with h5py.File(raw, "r") as f:
                yield f
        finally:
            raw.close()
        return
    with f:
        yield f


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
        if self.path.is_dir():
            raise UserError(f"{self.path}: is a directory; pass a file path for the run")
        if self.path.exists() and not overwrite:
            raise UserError(f"{self.path}: already exists; pass --force (overwrite=True) to replace it")
        self.swmr = swmr
        self.flush_every = flush_every
        self._lock = _WriterLock(self.path)
        try:
            f = _open_h5(self.path, "w", libver="latest")
            f.attrs.update(lossatlas_format="run", format_version=FORMAT_VERSION, loss=loss or "",
                           created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                           lossatlas_version=__version__, run_id=uuid.uuid4().hex, **header)
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
            if swmr:
                f.swmr_mode = True
        except BaseException:
            self._lock.release()
            raise
        self._f: h5py.File | None = f
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
                    ds.attrs["first_row"] = self._n_ckpt
        f, k = self._file, self._n_ckpt
        for p, (arr, _) in rows.items():
            ds = f[p]
            ds.resize(k + 1, axis=0)
            ds[k] = arr
            ds.flush()
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


class RunReader:
    """Read a run file, also while a writer is attached: every call reopens it and sees new rows."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with self._open() as f:
            _check_kind(f, self.path, "run")
            a = f.attrs
            self.model_spec: dict | None = json.loads(a.get("model", "null"))
            self.data_spec: dict | None = json.loads(a.get("data", "null"))
            self.optimizer: dict | None = json.loads(a.get("optimizer", "null"))
            self.attrs: dict = json.loads(a.get("attrs", "{}"))
            self.loss: str | None = str(a.get("loss", "")) or None
            self.created_at: str = str(a.get("created_at", ""))
            self.lossatlas_version: str = str(a.get("lossatlas_version", ""))
            self._fingerprint = hashlib.sha256(f"{a.get('run_id', '')}|{self.created_at}".encode()).hexdigest()[:16]

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
    def _tensors(group: h5py.Group, row: int) -> dict[str, Tensor]:
        out = {}
        for name, ds in group.items():
            if ds.attrs.get("first_row", 0) <= row < ds.shape[0]:
                out[_unescape(name)] = _numpy_to_tensor(ds[row], ds.attrs["torch_dtype"])
        return out

    @staticmethod
    def _scalars(group: h5py.Group, row: int) -> dict[str, float]:
        out = {}
        for name, ds in group.items():
            if row < ds.shape[0] and not math.isnan(v := float(ds[row])):
                out[_unescape(name)] = v
        return out

    def checkpoint(self, step: int, *, optimizer_state: bool = False) -> Checkpoint:
        """The checkpoint at ``step``; its optimizer state too if asked (None when not stored)."""
        with self._open() as f:
            row = self._row(f, step)
            ck = f["checkpoints"]
            opt = None
            if optimizer_state and ck["has_optimizer"][row]:
                opt = {_unescape(p): self._tensors(g, row) for p, g in ck["optimizer"].items()}
                opt = {p: s for p, s in opt.items() if s}
            return Checkpoint(step=int(step), params=self._tensors(ck["params"], row),
                              buffers=self._tensors(ck["buffers"], row), optimizer_state=opt,
                              attrs=self._scalars(ck["attrs"], row))

    def checkpoint_attrs(self, step: int) -> dict[str, float]:
        """The scalars stored with the checkpoint at ``step`` (``step`` itself, epoch, lr, ...)."""
        with self._open() as f:
            return {"step": int(step), **self._scalars(f["checkpoints/attrs"], self._row(f, step))}

    def log_names(self) -> list[str]:
        """The names in the per-step log, in order of first appearance (without "step")."""
        with self._open() as f:
            return [_unescape(n) for n in f["log"] if n != "step"]

    def log(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """The per-step log as ``{"step": (N,) int64, name: (N,) float64}`` (NaN where not logged)."""
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


class ResultsStore:
    """The results file of a run: one labelled group per (probe, config key, step).

    ``mode`` is ``"r"`` (read only; the file must exist) or ``"a"`` (create if missing). A file
    recorded for another run (a different ``run_fingerprint``) is refused.
    """

    def __init__(self, path: str | Path, *, run_fingerprint: str | None = None, mode: str = "a") -> None:
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        self.path, self.mode = Path(path), mode
        if not self.path.exists():
            if mode == "r":
                raise UserError(f"{self.path}: no such results file; run a probe first (e.g. `lossatlas hessian`)")
            with _open_h5(self.path, "w-") as f:
                f.attrs.update(lossatlas_format="results", format_version=FORMAT_VERSION,
                               run_fingerprint=run_fingerprint or "", lossatlas_version=__version__)
            return
        with _open_h5(self.path, "r") as f:
            _check_kind(f, self.path, "results")
            stored = str(f.attrs.get("run_fingerprint", ""))
        if run_fingerprint and stored and stored != run_fingerprint:
            raise UserError(f"{self.path}: holds results of another run (fingerprint {stored}, this run "
                            f"{run_fingerprint}); pass another results path or delete the file")
        if run_fingerprint and not stored and mode == "a":
            with _open_h5(self.path, "r+") as f:
                f.attrs["run_fingerprint"] = run_fingerprint

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
        with _open_h5(self.path, "r+") as f:
            parent = f.require_group(_escape(result.probe)).require_group(_escape(key))
            tmp = f".{name}.tmp"  # write the new entry aside, then swap it in
            if tmp in parent:
                del parent[tmp]
            g = parent.create_group(tmp, track_order=True)
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
            g.attrs.update(attrs)
            if name in parent:
                del parent[name]
            parent.move(tmp, name)

    def read(self, probe: str, key: str, step: int | None) -> tuple[Result, dict] | None:
        """``(result, info)`` stored for (probe, key, step), or None; info has status, data_fingerprint,
        elapsed_s, version."""
        path = f"{_escape(probe)}/{_escape(key)}/{_step_name(step)}"
        with _open_h5(self.path, "r") as f:
            if path not in f:
                return None
            g = f[path]
            values, coords = {}, {}
            for n, ds in g.items():
                (coords if ds.attrs.get("role") == "coord" else values)[_unescape(n)] = _read_array(ds)
            a = g.attrs
            dims = {k: tuple(v) for k, v in json.loads(a["dims"]).items()}
            result = Result(probe=probe, config=json.loads(a["config"]), step=step, values=values,
                            dims=dims, coords=coords, meta=json.loads(a["meta"]))
            info = {"status": str(a["status"]), "data_fingerprint": str(a["data_fingerprint"]),
                    "elapsed_s": float(a["elapsed_s"]), "version": str(a["lossatlas_version"]),
                    "written_at": float(a["written_at"])}
            return result, info

    def entries(self, probe: str | None = None) -> list[dict]:
        """Every stored entry (of ``probe`` if given): probe, key, step, status, config, data_fingerprint."""
        out = []
        with _open_h5(self.path, "r") as f:
            for p, pg in f.items():
                if probe is not None and _unescape(p) != probe:
                    continue
                for k, kg in pg.items():
                    for s, g in kg.items():
                        if s.startswith("."):
                            continue  # an interrupted write
                        a = g.attrs
                        out.append({"probe": _unescape(p), "key": _unescape(k), "step": None if s == "none" else int(s),
                                    "status": str(a["status"]), "config": json.loads(a["config"]),
                                    "data_fingerprint": str(a["data_fingerprint"]),
                                    "elapsed_s": float(a["elapsed_s"]), "written_at": float(a["written_at"])})
        return out

    def latest(self, probe: str, step: int | None) -> tuple[Result, dict] | None:
        """The most recently written entry for (probe, step), whatever its config key; None if none."""
        found = [e for e in self.entries(probe) if e["step"] == step]
        if not found:
            return None
        newest = max(found, key=lambda e: e["written_at"])
        return self.read(probe, newest["key"], step)
