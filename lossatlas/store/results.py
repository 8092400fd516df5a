"""The results file: one labelled group per (probe, config key, step), every change copy-on-write.

Each entry also carries a readable ``label`` attribute (``hessian · ggn · class=3 · 256 examples``, see
``lossatlas.store.labels``) and each ``/<probe>/<key>`` group may carry the user's ``name`` (``--name``).

Every change happens under an exclusive lock, and every dataset and entry is checksummed (the layout is in
``lossatlas.store``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import h5py
import numpy as np

from lossatlas._version import __version__
from lossatlas.checks import check_choice
from lossatlas.errors import UserError
from lossatlas.probes.base import Result
from lossatlas.store import integrity
from lossatlas.store.h5 import (
    LOCKED,
    RESULTS_FORMAT_VERSION,
    TRUNCATED,
    OpenError,
    check_kind,
    damage_is_user_error,
    dumps,
    escape,
    first_line,
    open_h5,
    unescape,
)
from lossatlas.store.integrity import Damaged
from lossatlas.store.labels import changed_settings, label_of
from lossatlas.store.locks import exclusive

STATUSES = ("complete", "partial")
LABEL_ATTR = "label"  # an entry's readable label (lossatlas.store.labels.label_of), written with it
CHANGED_ATTR = "changed"  # JSON of the entry's settings that differ from the probe's defaults, written with it
NAME_ATTR = "name"  # a configuration's user name (--name), an attribute of its /<probe>/<key> group


def default_results_path(run_path: str | Path) -> Path:
    """The results file next to a run: ``run.h5`` -> ``run.results.h5``."""
    run_path = Path(run_path)
    if run_path.suffix == ".h5":
        return run_path.with_suffix(".results.h5")
    return run_path.with_name(run_path.name + ".results.h5")


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


# the NAME of an HDF5 dimension scale that is a netCDF dimension without a coordinate variable, followed by its
# length in 10 characters: the netCDF-4 convention (netCDF-C, h5netcdf) for an axis that has no coordinates
_NOT_A_VARIABLE = "This is a netCDF dimension but not a netCDF variable."
DIMENSION_ROLE = "dimension"  # the role of such a scale: it holds no data and is no value or coord of the Result


def _dimension_scale(g: h5py.Group, scales: dict[tuple[str, int], h5py.Dataset], dim: str, n: int,
                     owner: str) -> h5py.Dataset:
    """The dimension scale of an axis ``dim`` of ``n`` points that has no coordinates, created on first use.

    netCDF-4 gives each dimension of a group one length and one name, the scale's link name: the axis keeps the
    name ``dim`` unless another axis of that name has another length (then ``<dim>_<owner>``, ``owner`` the value
    that first has it, as "k_bottom_eigenvalues" beside "k") or a value or coord already holds the name (then
    ``_dim`` is appended). Axes with the same name and length share one scale. The scale stores nothing (an
    unwritten dataset takes no space in the file): its NAME marks it as a dimension without a variable.
    """
    known = scales.get((dim, n))
    if known is not None:
        return known
    for link in (escape(dim), escape(f"{dim}_{owner}")):
        if link not in g:
            break
    while link in g:
        link += "_dim"
    ds = g.create_dataset(link, shape=(n,), dtype="f4")
    ds.make_scale(f"{_NOT_A_VARIABLE}{n:10d}")
    ds.attrs["role"] = DIMENSION_ROLE
    scales[(dim, n)] = ds
    return ds


def _label_axes(g: h5py.Group, result: Result) -> None:
    """Attach an HDF5 dimension scale to every axis of every value and coord of ``result`` stored in ``g``.

    A 1-D coord is the scale of its own axis (a netCDF coordinate variable); any other axis gets a
    coordinate-less scale (``_dimension_scale``). An axis half-labelled (a scale on some axes, none on others)
    makes netCDF-4 readers (h5netcdf, xarray) refuse the whole group, so no axis is left out. Each axis also
    keeps its lossatlas name as the HDF5 dimension label.
    """
    scales: dict[tuple[str, int], h5py.Dataset] = {}
    for name in [*result.values, *result.coords]:
        ds = g[escape(name)]
        if name in result.coords and ds.ndim == 1:
            continue  # a coordinate variable: the scale of its own axis
        dims = result.dims[name] if name in result.values else tuple(f"{name}_dim{i}" for i in range(ds.ndim))
        for axis, dim in enumerate(dims):
            c = result.coords.get(dim) if name in result.values else None
            scale = g[escape(dim)] if c is not None else _dimension_scale(g, scales, dim, ds.shape[axis], name)
            ds.dims[axis].label = dim
            ds.dims[axis].attach_scale(scale)


_ENTRY_ATTRS = ("config", "meta", "dims", "data_fingerprint", "lossatlas_version", "elapsed_s", "status", "written_at")


def _array_digest(arr: np.ndarray) -> int:
    """The checksum of a stored value or coord: its dtype, shape and bytes as ``_read_array`` gives them."""
    head = np.frombuffer(f"{arr.dtype.str}{arr.shape}".encode(), np.uint8)
    return integrity.digest(np.concatenate([head, np.frombuffer(arr.tobytes(), np.uint8)]))


def _entry_digest(attrs: Mapping[str, Any], names: Sequence[str]) -> int:
    """The checksum of an entry's attributes and of the names of its datasets."""
    norm = {k: float(attrs[k]) if isinstance(attrs[k], (float, np.floating)) else str(attrs[k]) for k in _ENTRY_ATTRS}
    text = json.dumps({"attrs": norm, "datasets": sorted(names)}, sort_keys=True)
    return integrity.digest(np.frombuffer(text.encode(), np.uint8))


class ResultsStore:
    """The results file of a run: one labelled group per (probe, config key, step).

    ``mode`` is ``"r"`` (read only; the file must exist) or ``"a"`` (created by the first write, so a
    command refused before it stored anything leaves no file; a folder it cannot be written in is refused
    at once). A file recorded for another run (a different ``run_fingerprint``) is refused.

    Every change is copy-on-write under an exclusive lock (``<file>.lock``): the file is copied into
    memory, changed, written to a temporary next to it, synced and renamed over the original. A
    failure (a full disk, a kill) leaves the original untouched; writers in several processes all
    land. Creation links a finished file into place, so a killed process never leaves a stub; an
    existing file that is not a readable results file is refused, never overwritten. Every dataset
    carries ``digest`` (the checksum of its bytes) and every entry ``digest`` (of its attributes):
    reading checks them.
    """

    def __init__(self, path: str | Path, *, run_fingerprint: str | None = None, mode: str = "a") -> None:
        check_choice("mode", mode, ("r", "a"))
        self.path, self.mode = Path(path), mode
        self._fingerprint = run_fingerprint or ""
        if self.path.is_dir():
            raise UserError(f"{self.path}: is a directory; pass a results file path")
        if not self.path.exists():
            if mode == "r":
                raise UserError(f"{self.path}: no such results file; run a probe first (e.g. `lossatlas hessian`)")
            with exclusive(self.path):  # fails now, not after a long computation, where it cannot be written
                integrity.remove_dead_temps(self.path)
            if not self.path.exists():
                return
        elif mode == "a":
            integrity.remove_dead_temps(self.path)  # a killed writer's temporary, also when nothing is written
        stored = self._stored_fingerprint()
        if run_fingerprint and stored and stored != run_fingerprint:
            raise UserError(f"{self.path}: holds results of another run (fingerprint {stored}, this run "
                            f"{run_fingerprint}); pass another results path or delete the file")
        if run_fingerprint and not stored and mode == "a":
            self._change(lambda f: f.attrs.__setitem__("run_fingerprint", run_fingerprint))

    def _stored_fingerprint(self) -> str:
        """The header's run fingerprint.

        An existing file that is not a readable results file is refused, saying what to do; it is never
        overwritten.
        """
        try:
            f = open_h5(self.path, "r")
        except OpenError as e:
            if e.failure == LOCKED:
                raise
            reason = ("it is truncated, as an interrupted creation or copy leaves it" if e.failure == TRUNCATED
                      else e.what)
            raise self._unreadable(reason) from None
        with f:
            if "lossatlas_format" not in f.attrs and not len(f):
                raise self._unreadable("an empty HDF5 file: its creation never finished")
            check_kind(f, self.path, "results")
            return str(f.attrs.get("run_fingerprint", ""))

    def _unreadable(self, reason: str) -> UserError:
        return UserError(f"{self.path}: exists but is not a readable results file ({reason}); move it aside "
                         f"(mv {self.path} {self.path}.broken) and rerun to start a new one, or pass another "
                         "--results path")

    def _create(self) -> None:
        """Write the header under a temporary name and link it into place (called under the lock)."""
        image = io.BytesIO()
        with h5py.File(image, "w") as f:
            f.attrs.update(lossatlas_format="results", format_version=RESULTS_FORMAT_VERSION,
                           run_fingerprint=self._fingerprint, lossatlas_version=__version__)
        self._install(image.getvalue(), overwrite=False)

    def _change(self, change: Any) -> None:
        """Apply ``change(h5py.File)`` to a copy and rename the copy over the file, under the lock.

        On any failure the file is untouched. The copy is changed in memory and then written with plain file
        I/O, so HDF5 itself never meets a full disk (it cannot close a file it failed to flush).
        """
        with exclusive(self.path):
            integrity.remove_dead_temps(self.path)
            if not self.path.exists():  # the first write, or deleted by hand since it was opened
                self._create()
            try:
                image = io.BytesIO(self.path.read_bytes())
                f = h5py.File(image, "r+")
                try:
                    change(f)
                finally:
                    f.close()
            except OSError as e:
                if integrity.disk_full(e):  # memory and HDF5 can report ENOSPC too
                    raise integrity.disk_full_error(self.path) from None
                raise
            self._install(image.getvalue(), overwrite=True)

    def _install(self, data: bytes, *, overwrite: bool) -> None:
        """Write ``data`` to a temporary next to the file, sync it, and give it the file's name."""
        tmp = integrity.temp_path(self.path)
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
            integrity.publish(tmp, self.path, overwrite=overwrite)
        except BaseException as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if integrity.disk_full(e):
                raise integrity.disk_full_error(self.path) from None
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
        check_choice("status", status, STATUSES)
        clash = set(result.values) & set(result.coords)
        if clash:
            raise ValueError(f"Result {result.probe!r}: {sorted(clash)} are both values and coords; rename one")
        for name in result.values:
            for axis, dim in enumerate(result.dims[name]):
                c = result.coords.get(dim)
                if c is not None and (c.ndim != 1 or c.shape[0] != result.values[name].shape[axis]):
                    raise ValueError(f"Result {result.probe!r}: coord {dim!r} has shape {c.shape} but axis {axis} "
                                     f"of {name!r} has {result.values[name].shape[axis]} points")
        attrs = {"config": dumps(result.config, "config"), "meta": dumps(result.meta, "meta"),
                 "dims": dumps({k: list(v) for k, v in result.dims.items()}, "dims"),
                 "data_fingerprint": data_fingerprint, "lossatlas_version": __version__,
                 "elapsed_s": float(elapsed_s), "status": status, "written_at": time.time()}
        name = _step_name(result.step)
        label = label_of(result.probe, result.config, result.meta, key=key)  # readable: what differs from defaults
        changed = json.dumps(changed_settings(result.probe, result.config), default=str)

        def change(f: h5py.File) -> None:
            parent = f.require_group(escape(result.probe)).require_group(escape(key))
            if name in parent:
                del parent[name]
            g = parent.create_group(name, track_order=True)
            stored = []
            for c, arr in result.coords.items():
                stored.append(ds := _write_array(g, escape(c), arr, "coord"))
                if ds.ndim == 1:
                    ds.make_scale(c)
            for v, arr in result.values.items():
                stored.append(_write_array(g, escape(v), arr, "value"))
            _label_axes(g, result)  # every axis named by a dimension scale: the group reads as netCDF-4
            for ds in stored:
                ds.attrs["digest"] = np.uint64(_array_digest(_read_array(ds)))
            f.attrs["format_version"] = RESULTS_FORMAT_VERSION  # a file of format 1 now holds a group of format 2
            g.attrs.update(attrs)
            g.attrs["digest"] = np.uint64(_entry_digest(attrs, list(g)))
            g.attrs[LABEL_ATTR] = label  # outside the digest: entries written before labels verify as they did
            g.attrs[CHANGED_ATTR] = changed  # so readers list the settings without importing the probes (torch)

        self._change(change)

    @staticmethod
    def _entry(g: h5py.Group, probe: str, step: int | None) -> tuple[Result, dict]:
        """The entry in group ``g``, its checksums checked (``Damaged`` names what fails)."""
        if g is None:  # h5py gives None for a group it cannot open
            raise Damaged(None, "its group cannot be read")
        values, coords = {}, {}
        for n, ds in g.items():
            what = f"dataset {unescape(n)!r}"
            if ds is None:  # h5py gives None for an object it cannot open
                raise Damaged(None, f"{what} cannot be read (its object header is damaged)")
            try:
                if ds.attrs.get("role") == DIMENSION_ROLE:
                    continue  # the scale of an axis without coordinates: no part of the Result (its name is checked)
                arr, want, role = _read_array(ds), ds.attrs.get("digest"), ds.attrs.get("role")
            except OSError as e:
                raise Damaged(None, f"{what} cannot be read: {first_line(e)}") from None
            if want is not None and _array_digest(arr) != int(want):
                raise Damaged(None, f"{what} fails its checksum")
            (coords if role == "coord" else values)[unescape(n)] = arr
        try:
            a = g.attrs
            stored = {k: a[k] for k in _ENTRY_ATTRS}
            want = a.get("digest")
        except (OSError, KeyError) as e:
            raise Damaged(None, f"its attributes cannot be read: {first_line(e)}") from None
        if want is not None and _entry_digest(stored, list(g)) != int(want):
            raise Damaged(None, "its attributes fail their checksum")
        try:
            dims = {k: tuple(v) for k, v in json.loads(stored["dims"]).items()}
            result = Result(probe=probe, config=json.loads(stored["config"]), step=step, values=values,
                            dims=dims, coords=coords, meta=json.loads(stored["meta"]))
        except (ValueError, TypeError, AttributeError) as e:
            raise Damaged(None, f"its attributes are not valid ({first_line(e)})") from None
        info = {"status": str(stored["status"]), "data_fingerprint": str(stored["data_fingerprint"]),
                "elapsed_s": float(stored["elapsed_s"]), "version": str(stored["lossatlas_version"]),
                "written_at": float(stored["written_at"])}
        return result, info

    def _damaged(self, probe: str, key: str, step: int | None, e: Damaged) -> UserError:
        return UserError(f"{self.path}: result {probe}/{key} at step {step if step is not None else 'none'} is "
                         f"damaged ({e.reason}); the file was corrupted — recompute it (rerun the probe with "
                         "--force) or restore the file from a copy")

    def read(self, probe: str, key: str, step: int | None) -> tuple[Result, dict] | None:
        """``(result, info)`` stored for (probe, key, step), or None.

        info has status, data_fingerprint, elapsed_s, version. Its checksums are checked: a damaged entry
        raises UserError naming it.
        """
        path = f"{escape(probe)}/{escape(key)}/{_step_name(step)}"
        if not self.path.exists():  # nothing written yet
            return None
        with damage_is_user_error(self.path), open_h5(self.path, "r") as f:
            if path not in f:
                return None
            try:
                return self._entry(f[path], probe, step)
            except Damaged as e:
                raise self._damaged(probe, key, step, e) from None

    def _groups(self, f: h5py.File, probe: str | None = None) -> Iterator[tuple[str, str, int | None, h5py.Group]]:
        for p, pg in f.items():
            if probe is not None and unescape(p) != probe:
                continue
            for k, kg in pg.items():
                for s, g in kg.items():
                    if not s.startswith("."):  # a temporary group of an interrupted write (older files)
                        yield unescape(p), unescape(k), None if s == "none" else int(s), g

    def entries(self, probe: str | None = None) -> list[dict]:
        """Every stored entry (of ``probe`` if given).

        Each is a dict: probe, key, step, status, config, data_fingerprint, elapsed_s, written_at, ``label`` (the
        readable label stored with it; None for an entry written before labels, which
        ``lossatlas.store.labels.configurations`` labels from its settings) and ``name`` (the user name of its
        configuration, None without one).
        """
        out = []
        if not self.path.exists():  # nothing written yet
            return out
        with damage_is_user_error(self.path), open_h5(self.path, "r") as f:
            for p, k, s, g in self._groups(f, probe):
                try:
                    a = g.attrs
                    entry = {"probe": p, "key": k, "step": s, "status": str(a["status"]),
                             "config": json.loads(a["config"]), "data_fingerprint": str(a["data_fingerprint"]),
                             "elapsed_s": float(a["elapsed_s"]), "written_at": float(a["written_at"])}
                    name = g.parent.attrs.get(NAME_ATTR)
                    entry["name"] = str(name) if name else None
                    label = a.get(LABEL_ATTR)
                    entry["label"] = str(label) if label else None  # None: written before labels existed
                    changed = a.get(CHANGED_ATTR)
                    entry["changed"] = json.loads(changed) if changed else None
                    out.append(entry)
                except (KeyError, ValueError, OSError, AttributeError) as e:
                    damage = Damaged(None, f"its attributes cannot be read: {first_line(e)}")
                    raise self._damaged(p, k, s, damage) from None
        return out

    def names(self, probe: str) -> dict[str, str]:
        """The user names (``--name``) of ``probe``'s configurations: {key: name}."""
        out: dict[str, str] = {}
        if not self.path.exists():
            return out
        with damage_is_user_error(self.path), open_h5(self.path, "r") as f:
            pg = f.get(escape(probe))
            for k, kg in (pg.items() if pg is not None else ()):
                name = kg.attrs.get(NAME_ATTR) if kg is not None else None
                if name:
                    out[unescape(k)] = str(name)
        return out

    @staticmethod
    def check_name_form(name: str) -> None:
        """UserError unless ``name`` is a usable configuration name: non-empty, one line, no surrounding spaces."""
        if not name.strip() or name != name.strip() or "\n" in name:
            raise UserError(f"--name {name!r}: a name must be non-empty, on one line, without surrounding spaces; "
                            "e.g. --name full-data")

    def check_name(self, probe: str, key: str | None, name: str) -> None:
        """UserError (one line) when ``name`` is empty or names another configuration of ``probe`` than ``key``."""
        self.check_name_form(name)
        taken = {k: n for k, n in self.names(probe).items() if n == name and k != key}
        if taken:
            other = next(iter(taken))
            raise UserError(f"--name {name!r} already names another {probe} configuration (key {other}) in "
                            f"{self.path}; choose another name, or see `lossatlas info {self.path}`")

    def set_name(self, probe: str, key: str, name: str) -> None:
        """Name the configuration ``/<probe>/<key>`` (an attribute of its group); refused if another has the name."""
        if self.mode != "a":
            raise ValueError(f"{self.path}: opened read-only (mode 'r'); open with mode 'a' to write")
        self.check_name(probe, key, name)

        def change(f: h5py.File) -> None:
            path = f"{escape(probe)}/{escape(key)}"
            if path not in f:
                raise UserError(f"{self.path}: no {probe} result under key {key} to name; compute it first")
            f[path].attrs[NAME_ATTR] = name

        self._change(change)

    def verify(self) -> list[dict]:
        """Every entry with its checksums checked: probe, key, step and status.

        The status is "ok", "damaged: <what>" or "unverified (no checksums)" for an entry written before
        checksums existed.
        """
        out = []
        if not self.path.exists():  # nothing written yet
            return out
        with damage_is_user_error(self.path), open_h5(self.path, "r") as f:
            for p, k, s, g in self._groups(f):
                try:
                    self._entry(g, p, s)
                    status = "ok" if "digest" in g.attrs else "unverified (no checksums)"
                except Damaged as e:
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
