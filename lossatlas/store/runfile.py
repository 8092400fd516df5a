"""The run file: ``RunWriter`` appends checkpoints and a per-step log, ``RunReader`` reads them.

Checkpoints hold every tensor bit for bit, with its checksum; the writer runs under HDF5 SWMR, so the reader reads
also while they are written (the layout is in ``lossatlas.store``, the crash-safety protocol in
``lossatlas.store.recovery``).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import h5py
import numpy as np

from lossatlas import trust
from lossatlas._version import __version__
from lossatlas.errors import UserError
from lossatlas.store import integrity
from lossatlas.store.h5 import (
    FORMAT_VERSION,
    check_kind,
    dumps,
    escape,
    first_line,
    numpy_to_tensor,
    open_h5,
    tensor_to_numpy,
    unescape,
)
from lossatlas.store.integrity import Damaged
from lossatlas.store.locks import WriterLock, writer_attached
from lossatlas.store.recovery import open_read, truncation

if TYPE_CHECKING:  # tensors are built by h5.numpy_to_tensor, which imports torch on first use
    from torch import Tensor

_ROW_CHUNK_BYTES = 64 * 2**20  # at most this much per chunk of a checkpoint row
_DISK_MARGIN = 2**20  # free bytes a checkpoint leaves for HDF5's metadata and the log
_DIGESTS = "checkpoints/digest"  # (K, T) uint64: a checksum per checkpoint row per tensor


def _row_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunk (1, *shape): one checkpoint row per chunk, split along the largest axes if huge."""
    chunk = [max(1, d) for d in shape]
    while math.prod(chunk) * itemsize > _ROW_CHUNK_BYTES:
        i = int(np.argmax(chunk))
        chunk[i] = (chunk[i] + 1) // 2
    return (1, *chunk)


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
        header = {"model": dumps(model_spec, "model_spec"), "data": dumps(data_spec, "data_spec"),
                  "optimizer": dumps(optimizer, "optimizer"), "attrs": dumps(attrs or {}, "attrs")}
        # factory specs signed with this user's key: reading them back needs no --trust-factory
        header["spec_signatures"] = trust.sign_specs({"model": header["model"], "data": header["data"]})
        if self.path.is_dir():
            raise UserError(f"{self.path}: is a directory; pass a file path for the run")
        if self.path.exists() and not overwrite:
            raise UserError(f"{self.path}: already exists; pass --force (overwrite=True) to replace it")
        self.swmr = swmr
        self.flush_every = flush_every
        self._lock = WriterLock(self.path)
        integrity.remove_dead_temps(self.path)
        tmp, f = integrity.temp_path(self.path), None
        try:  # built under a temporary name, then renamed: a kill here never leaves a stub at ``path``
            f = open_h5(tmp, "w", libver="latest")
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
                self._grow_dataset(f["log"], escape(n), np.float64, fill=np.nan).attrs["first_row"] = 0
            f.flush()
            integrity.publish(tmp, self.path, overwrite=overwrite)  # the open handle follows the rename (POSIX)
            if swmr:
                f.swmr_mode = True
        except BaseException as e:
            if f is not None:
                with contextlib.suppress(Exception):
                    f.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._lock.release()
            if integrity.disk_full(e):
                raise integrity.disk_full_error(self.path) from None
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
        self._check_open()
        return self._f

    def _check_open(self) -> None:
        if self._f is None:
            raise ValueError(f"{self.path}: the RunWriter is closed")

    @contextlib.contextmanager
    def _structure(self) -> Iterator[h5py.File]:
        """Leave SWMR briefly to create datasets: close, reopen (waiting out readers), restart SWMR.

        This is the one window in which a kill leaves the file's open-for-write flags set; see ``recovery``.
        """
        if not self.swmr:
            yield self._file
            return
        self._file.close()
        self._f = None
        self._f = open_h5(self.path, "r+", libver="latest")
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
                rows[f"checkpoints/{group}/{escape(k)}"] = tensor_to_numpy(v, f"{group} {k!r}")
        for p, states in (optimizer_state or {}).items():
            if not isinstance(p, str):
                raise ValueError(f"optimizer_state keys must be parameter names (str), got {p!r}")
            for s, v in states.items():
                rows[f"checkpoints/optimizer/{escape(p)}/{escape(s)}"] = tensor_to_numpy(v, f"optimizer {p!r} {s!r}")
        scalars: dict[str, float] = {}
        for k, v in (attrs or {}).items():
            try:
                scalars[f"checkpoints/attrs/{escape(k)}"] = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"checkpoint attr {k!r} must be a number, got {v!r}") from None
        self._check_rows(f, rows, optimizer_state is not None)
        free = integrity.free_bytes(self.path)
        need = sum(arr.nbytes for arr, _ in rows.values()) + _DISK_MARGIN
        if free is not None and free < need:  # refuse before HDF5 meets a full disk: it crashes on one
            raise integrity.disk_full_error(self.path, f"the checkpoint needs {integrity.size_text(need)}; free some "
                                            "space (the checkpoints written so far are intact) and train again")
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
            digests[self._digest_cols[p]] = integrity.digest(arr)
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
                    raise ValueError(f"{unescape(p)}: shape {tuple(arr.shape)} dtype {dtype_name} differs from "
                                     f"earlier checkpoints ({ds.shape[1:]}, {ds.attrs['torch_dtype']}); "
                                     "write a new run for a different model")
        groups = ["checkpoints/params", "checkpoints/buffers"]
        if has_optimizer:
            groups += [f"checkpoints/optimizer/{p}" for p in f["checkpoints/optimizer"]]
        for g in groups:
            for name in f[g]:
                if f"{g}/{name}" not in rows:
                    raise ValueError(f"{unescape(g)}/{unescape(name)} is missing from this checkpoint but "
                                     "present in earlier ones; every checkpoint must carry the same keys")

    def _digest_dataset(self, f: h5py.File) -> h5py.Dataset:
        """``/checkpoints/digest`` (K, T) uint64: one 64-bit BLAKE2b per checkpoint row and tensor.

        Row k, column ``digest_column`` of a tensor dataset holds the 64-bit BLAKE2b of that tensor's row k (0
        where the row does not carry the tensor).
        """
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
        self._check_open()
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"log step must be a non-negative int, got {step!r}")
        row = {}
        for k, v in values.items():
            if k == "step":
                raise ValueError("'step' is reserved in the log; pass the step as the first argument")
            try:
                row[escape(k)] = float(v)
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
            cols[escape(name)] = arr
        self._check_open()
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


class RunReader:
    """Read a run file, also while a writer is attached: every call reopens it and sees new rows.

    A truncated file (shorter than its superblock says, no writer attached) is refused, naming its first
    damaged checkpoint, unless ``damaged_ok`` (to ``verify`` it): its log cannot be trusted then, and only
    checkpoints that pass their checksums are read.
    """

    def __init__(self, path: str | Path, *, damaged_ok: bool = False) -> None:
        self.path = Path(path)
        with self._open() as f:
            check_kind(f, self.path, "run")
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
        self.truncated: tuple[int, int] | None = truncation(self.path)
        if self.truncated is not None and not damaged_ok:
            raise self._truncated_error()

    def _truncated_error(self) -> UserError:
        """Name the first checkpoint of the damaged tail (truncation cuts the last-written rows)."""
        real, stored = self.truncated or (0, 0)
        first: tuple[int, Damaged] | None = None
        with self._open() as f:
            steps = self._committed(f["checkpoints/step"]).tolist()
            for row in range(len(steps) - 1, -1, -1):
                try:
                    self._read_checkpoint(f, row, steps[row], optimizer_state=True)
                    break
                except Damaged as e:
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
        return open_read(self.path)

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

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each stored parameter's shape (buffers excluded), read from the file's metadata: no tensor, no torch.

        Empty before the first checkpoint. ``sum(math.prod(s) for s in shapes.values())`` is the parameter count.
        """
        with self._open() as f:
            group = f.get("checkpoints/params")
            if group is None:
                return {}
            return {unescape(name): tuple(int(n) for n in ds.shape[1:]) for name, ds in group.items() if ds is not None}

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
            what = prefix + unescape(name)
            if ds is None:  # h5py gives None for an object it cannot open
                raise Damaged(what, "cannot be read (its object header is damaged)")
            try:
                if not ds.attrs.get("first_row", 0) <= row < ds.shape[0]:
                    continue
                arr = np.asarray(ds[row])
                col = ds.attrs.get("digest_column") if digests is not None else None
            except OSError as e:
                raise Damaged(what, f"cannot be read: {first_line(e)}") from None
            if digests is not None and (col is None or col >= digests.size
                                        or integrity.digest(arr) != int(digests[col])):
                raise Damaged(what, "fails its checksum")
            out[unescape(name)] = numpy_to_tensor(arr, ds.attrs["torch_dtype"])
        return out

    @staticmethod
    def _scalars(group: h5py.Group, row: int) -> dict[str, float]:
        out = {}
        for name, ds in group.items():
            if ds is None:
                raise Damaged(None, f"its attribute {unescape(name)!r} cannot be read")
            if row < ds.shape[0] and not math.isnan(v := float(ds[row])):
                out[unescape(name)] = v
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
            raise Damaged("checksums", f"cannot be read: {first_line(e)}") from None

    def _read_checkpoint(self, f: h5py.File, row: int, step: int, optimizer_state: bool) -> Checkpoint:
        try:
            digests = self._digests(f, row)
            ck = f["checkpoints"]
            params = self._tensors(ck["params"], row, digests)
            buffers = self._tensors(ck["buffers"], row, digests)
            opt = None
            if optimizer_state and ck["has_optimizer"][row]:
                opt = {unescape(p): self._tensors(g, row, digests, f"optimizer/{unescape(p)}/")
                       for p, g in ck["optimizer"].items()}
                opt = {p: s for p, s in opt.items() if s}
            return Checkpoint(step=int(step), params=params, buffers=buffers, optimizer_state=opt,
                              attrs=self._scalars(ck["attrs"], row))
        except (OSError, KeyError) as e:  # a group or a scalar that HDF5 cannot read
            raise Damaged(None, f"cannot be read: {first_line(e)}") from None

    def _damaged(self, step: int, e: "Damaged") -> UserError:
        what = f"tensor {e.tensor!r} {e.reason}" if e.tensor else e.reason
        return UserError(f"{self.path}: checkpoint at step {step} is damaged ({what}); the file was truncated "
                         "or corrupted — restore it from a copy")

    def checkpoint(self, step: int, *, optimizer_state: bool = False) -> Checkpoint:
        """The checkpoint at ``step``; its optimizer state too if asked (None when not stored).

        Every tensor is checked against its checksum: a damaged one raises UserError naming the step and the
        tensor.
        """
        with self._open() as f:
            row = self._row(f, step)
            try:
                return self._read_checkpoint(f, row, step, optimizer_state)
            except Damaged as e:
                raise self._damaged(step, e) from None

    def verify(self) -> dict[int, str]:
        """Read every checkpoint (optimizer state included) and check its checksums.

        Returns step -> "ok", "damaged: <tensor>" or "unverified (no checksums)" (a file written before
        checksums existed).
        """
        out = {}
        with self._open() as f:
            steps = self._committed(f["checkpoints/step"]).tolist()
            verified = "checksums" in f.attrs or _DIGESTS in f
            for row, step in enumerate(steps):
                try:
                    self._read_checkpoint(f, row, step, optimizer_state=True)
                except Damaged as e:
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
            except Damaged as e:
                raise self._damaged(step, e) from None

    def log_names(self) -> list[str]:
        """The names in the per-step log, in order of first appearance (without "step")."""
        self._refuse_truncated("log")
        with self._open() as f:
            return [unescape(n) for n in f["log"] if n != "step"]

    def log(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """The per-step log as ``{"step": (N,) int64, name: (N,) float64}`` (NaN where not logged)."""
        self._refuse_truncated("log")
        with self._open() as f:
            log = f["log"]
            steps = self._committed(log["step"])
            known = [unescape(n) for n in log if n != "step"]
            unknown = [n for n in (names or []) if n not in known]
            if unknown:
                raise UserError(f"{self.path}: no log named {', '.join(map(repr, unknown))}; "
                                f"logged: {', '.join(known) or 'nothing yet'}")
            out = {"step": steps}
            for name in known if names is None else names:
                col = np.full(steps.shape, np.nan)
                data = log[escape(name)][: steps.size]
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


def file_kind(path: str | Path) -> str:
    """``"run"`` or ``"results"``: what lossatlas file ``path`` is; UserError for anything else."""
    path = Path(path)
    with open_read(path) as f:
        return check_kind(f, path, None)
