"""Stored results for other tools: xarray Datasets, VTK grids for ParaView, loss-landscape HDF5 surface files.

``open_results(path)`` gives every configuration in a results file as an ``xarray.Dataset`` (xarray is the
optional extra ``pip install lossatlas[xarray]``): the values of every stored step stacked along ``step``,
their axes named as the probe names them, with coordinates (grid axes, block names, classes, interpolation
coefficients), and the probe's settings as attributes. The results file itself is netCDF-4 readable too
(``xarray.open_dataset(path, engine="h5netcdf", group="<probe>/<key>/<step>")``, see ``lossatlas.store``).

A loss surface (``lossatlas surface``: L(θ* + x·d_x + y·d_y) on a grid, Li, Xu, Taylor, Studer & Goldstein 2018,
"Visualizing the Loss Landscape of Neural Nets") goes to

- ``to_vtk``: a VTK structured grid for ParaView, written by hand (no vtk dependency): the points
  (x, y, L(x, y)), so the surface is drawn in 3-D, and every grid value (loss, accuracy, extra metrics) as point
  data. ``.vtk`` gives the legacy ASCII format, any other suffix (``.vts``) the XML format with base64 binary
  arrays, which keeps NaN and inf bit for bit.
- ``to_loss_landscape_h5``: the surface file of Li et al.'s own code (github.com/tomgoldstein/loss-landscape,
  ``plot_surface.py``), which its ``plot_1D.py``, ``plot_2D.py`` and ``h52vtp.py`` read: ``xcoordinates`` (nx,),
  ``ycoordinates`` (ny,), ``train_loss`` and ``train_acc`` (accuracy in percent) of shape (nx, ny) — or (nx,) for
  a 1-D line. That code fills the (nx, ny) array in ``numpy.meshgrid(x, y)`` order (flat index iy·nx + ix holds
  L(x_ix, y_iy)), so the array's C-order bytes are those of lossatlas's (ny, nx) ``Z[iy, ix]``; for the square
  grids its plots assume, ``train_loss[i, j] = L(x_j, y_i)``, as ``plot_2D.py`` draws it.

``lossatlas export RUN --format xarray|vtk|loss-landscape -o OUT`` writes them from the command line
(``add_parser``). This module imports neither torch nor xarray until a function needs them.
"""

from __future__ import annotations

import argparse
import base64
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lossatlas.errors import UserError

FORMATS = ("xarray", "vtk", "loss-landscape")
XARRAY_FIX = "pip install lossatlas[xarray]"
SURFACE_PROBE = "surface"
_STEP_INFO = ("status", "elapsed_s", "data_fingerprint")  # per-step facts of the store, as coordinates along step


def _xarray(what: str):
    """The xarray module, or a one-line UserError saying how to install it."""
    try:
        import xarray
    except ImportError:
        raise UserError(f"{what} needs xarray, which is not installed; {XARRAY_FIX}") from None
    return xarray


# -- xarray -----------------------------------------------------------------------------------------------------
def _attr(value: Any) -> Any:
    """A setting as a netCDF attribute: a string or a number as itself, anything else (bool, None, list) as JSON."""
    if isinstance(value, str) or (isinstance(value, (int, float, np.integer, np.floating))
                                  and not isinstance(value, (bool, np.bool_))):
        return value
    from lossatlas.store.h5 import dumps

    return dumps(value, "setting")


def _stacked(arrays: Sequence[np.ndarray | None], shape: tuple[int, ...]) -> np.ndarray:
    """Arrays of one variable at every step in one array of ``(len(arrays), *shape)``.

    An array shorter than ``shape`` along an axis, or missing at a step (None), is padded: NaN for numbers (ints
    and bools become float64 to hold it), "" for strings.
    """
    present = [a for a in arrays if a is not None]
    dtype = np.result_type(*present)
    padded = any(a is None or a.shape != shape for a in arrays)
    fill: Any = 0
    if padded:
        if dtype.kind in "iub":
            dtype = np.dtype(np.float64)
        fill = "" if dtype.kind == "U" else b"" if dtype.kind == "S" else None if dtype.kind == "O" else np.nan
    out = np.full((len(arrays), *shape), fill, dtype=dtype)
    for i, a in enumerate(arrays):
        if a is not None:
            out[(i, *(slice(0, n) for n in a.shape))] = a
    return out


def _dimension_names(results: Sequence[Any]) -> dict[tuple[str, str], str]:
    """The Dataset dimension of each (variable, lossatlas axis name): one length per dimension, as xarray wants.

    Variables whose axis ``dim`` has the same length at every step share the dimension ``dim``; another length
    sequence gets ``<dim>_<variable>`` (as "k_bottom_eigenvalues" beside "k" when top and bottom k differ). A 1-D
    coordinate claims its name first, so the values it labels keep it.
    """
    names: dict[tuple[str, str], str] = {}
    claimed: dict[str, dict[tuple, str]] = {}  # lossatlas dim -> {lengths at each step: Dataset dim}
    taken: set[str] = set()
    variables: dict[str, tuple[str, ...]] = {}
    for r in results:  # coordinates first, then values, each in the order of first appearance
        for c, arr in r.coords.items():
            variables.setdefault(c, (c,) if arr.ndim == 1 else tuple(f"{c}_dim{i}" for i in range(arr.ndim)))
    for r in results:
        for v in r.values:
            variables.setdefault(v, r.dims[v])
    for var, dims in variables.items():
        for axis, dim in enumerate(dims):
            lengths = tuple(_axis_length(r, var, axis) for r in results)
            known = claimed.setdefault(dim, {})
            if lengths not in known:
                name = dim if not known else f"{dim}_{var}"
                while name in taken or (name != dim and name in variables):
                    name += "_dim"
                known[lengths] = name
                taken.add(name)
            names[(var, dim)] = known[lengths]
    return names


def _axis_length(r: Any, var: str, axis: int) -> int | None:
    arr = r.values.get(var, r.coords.get(var))
    return None if arr is None else int(arr.shape[axis])


def to_dataset(results: Sequence[Any], infos: Sequence[Mapping[str, Any]] | None = None,
               attrs: Mapping[str, Any] | None = None):
    """Results of one probe configuration as one ``xarray.Dataset``.

    With several results (or one at a step) the values are stacked along a dimension ``step`` (``result_step``
    if a value already has an axis named ``step``), padded with NaN where a step holds fewer points or lacks a
    value; a lone result without a step keeps its own shape. A 1-D coordinate equal at every step is the index
    of its dimension; one that differs between steps (a density grid, the checkpoints of a trajectory) is the
    coordinate ``<dim>_by_step`` over (step, dim). ``infos`` (the store's per-step status, elapsed_s,
    data_fingerprint) become coordinates along step; ``attrs`` the Dataset's attributes, and every setting of
    the first result's config one attribute each (a string or number as itself, anything else as JSON).
    """
    xr = _xarray("exporting results as xarray Datasets")
    results = list(results)
    if not results:
        raise ValueError("to_dataset: no results given")
    stack = not (len(results) == 1 and results[0].step is None)
    used = {d for r in results for dims in r.dims.values() for d in dims} | {c for r in results for c in r.coords}
    step_dim = "step" if "step" not in used else "result_step"
    names = _dimension_names(results)
    data_vars: dict[str, Any] = {}
    coords: dict[str, Any] = {}

    def variable(var: str, dims: tuple[str, ...], arrays: list[np.ndarray | None]) -> tuple[tuple[str, ...], Any]:
        shape = tuple(max((a.shape[i] for a in arrays if a is not None), default=0) for i in range(len(dims)))
        out_dims = tuple(names[(var, d)] for d in dims)
        if not stack:
            return out_dims, arrays[0]
        return (step_dim, *out_dims), _stacked(arrays, shape)

    coord_names = list(dict.fromkeys(c for r in results for c in r.coords))
    for c in coord_names:
        arrays = [r.coords.get(c) for r in results]
        first = next(a for a in arrays if a is not None)
        dims = (c,) if first.ndim == 1 else tuple(f"{c}_dim{i}" for i in range(first.ndim))
        same = all(a is not None and a.shape == first.shape and np.array_equal(a, first) for a in arrays)
        if first.ndim == 1 and (same or not stack):
            coords[names[(c, c)]] = ((names[(c, c)],), first)  # the index of its dimension
        else:
            key = f"{c}_by_step" if first.ndim == 1 else c
            coords[key] = variable(c, dims, arrays)
    value_names = list(dict.fromkeys(v for r in results for v in r.values))
    for v in value_names:
        dims = next(r.dims[v] for r in results if v in r.values)
        data_vars[v] = variable(v, dims, [r.values.get(v) for r in results])
    if stack:
        coords[step_dim] = ((step_dim,), np.array([-1 if r.step is None else int(r.step) for r in results]))
        for k in _STEP_INFO:
            if infos is not None and k not in data_vars and k not in coords:
                coords[k] = ((step_dim,), np.array([info.get(k) for info in infos]))
    ds = xr.Dataset(data_vars, coords=coords)
    head = results[0]
    meta = head.meta if not stack else {str(r.step): r.meta for r in results}
    out_attrs = {"probe": head.probe, "config": _attr(head.config), "meta": _attr(meta)}
    for k, value in head.config.items():
        if k not in out_attrs:
            out_attrs[k] = _attr(value)
    out_attrs.update({k: _attr(v) for k, v in (attrs or {}).items()})
    ds.attrs.update(out_attrs)
    return ds


def _results_path(path: str | Path) -> Path:
    """The results file of ``path``: itself if it is one, else the ``.results.h5`` next to a run file."""
    from lossatlas.store import RunReader, default_results_path, file_kind

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file; pass a run file (.h5) or its results file (.results.h5)")
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass a run file (.h5) or its results file (.results.h5)")
    if file_kind(path) == "results":
        return path
    with RunReader(path):  # a run file that is not one, truncated or damaged is refused here, in one line
        pass
    results = default_results_path(path)
    if not results.exists():
        raise UserError(f"{results}: no results stored for this run yet; run a probe first (e.g. `lossatlas surface "
                        f"{path} --step last`)")
    return results


def _configurations(path: Path, probe: str | None = None) -> list[dict]:
    """The stored configurations of ``path`` (of ``probe`` if given): probe, key, name, its entries by step."""
    from lossatlas.store import ResultsStore

    groups: dict[tuple[str, str], list[dict]] = {}
    for e in ResultsStore(path, mode="r").entries(probe):
        groups.setdefault((e["probe"], e["key"]), []).append(e)
    out = []
    for (p, k), entries in sorted(groups.items()):
        entries.sort(key=lambda e: (e["step"] is None, e["step"] or 0))
        label = next((e[n] for e in entries for n in ("name", "label") if e.get(n)), None)
        out.append({"probe": p, "key": k, "label": label, "name": label or f"{p}/{k}", "entries": entries})
    names = [c["name"] for c in out]
    for c in out:
        if names.count(c["name"]) > 1:  # two configurations share a label: their paths tell them apart
            c["name"] = f"{c['probe']}/{c['key']}"
    return out


def _read(path: Path, probe: str, key: str, step: int | None):
    from lossatlas.store import ResultsStore

    found = ResultsStore(path, mode="r").read(probe, key, step)
    if found is None:
        raise UserError(f"{path}: no {probe}/{key} result at step {step}; see `lossatlas info {path}`")
    return found


def open_results(path: str | Path, probe: str | None = None) -> dict[str, Any]:
    """Every stored configuration of a results file as an ``xarray.Dataset``: ``{name: Dataset}``.

    ``path`` is a results file or the run file next to it; ``probe`` keeps that probe's results only. The name is
    the configuration's label when the store has one, else ``"<probe>/<key>"``. Each Dataset holds the values of
    every stored step along ``step`` with their axes' names and coordinates, and the probe's settings as
    attributes (``to_dataset``); every entry's checksums are checked as it is read. Needs xarray
    (``pip install lossatlas[xarray]``: a UserError says so otherwise).
    """
    _xarray("lossatlas.open_results")
    path = _results_path(path)
    out: dict[str, Any] = {}
    for c in _configurations(path, probe):
        stepped = [e for e in c["entries"] if e["step"] is not None]
        for group, name in ((stepped, c["name"]), ([e for e in c["entries"] if e["step"] is None], None)):
            if not group:
                continue
            if name is None:  # a result with no step (as `track`'s) beside stepped ones keeps its own Dataset
                name = c["name"] if not stepped else f"{c['name']}@none"
            read = [_read(path, c["probe"], c["key"], e["step"]) for e in group]
            attrs = {"key": c["key"], **({"label": c["label"]} if c["label"] else {})}
            out[name] = to_dataset([r for r, _ in read], [i for _, i in read], attrs)
    return out


# -- surfaces ---------------------------------------------------------------------------------------------------
def _surface_grid(result: Any) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], str]:
    """``(x, y, {name: (ny, nx) array}, loss name)`` of a surface Result; a 1-D line has y = [0] and ny = 1."""
    loss = next((n for n in ("loss", "surface_loss") if n in getattr(result, "values", {})), None)
    if loss is None:
        raise UserError(f"{getattr(result, 'probe', 'result')} result: no loss grid to export (no value 'loss'); "
                        "export a result of `lossatlas surface`")
    dims = tuple(result.dims[loss])
    if dims not in (("y", "x"), ("x",)) or "x" not in result.coords or (dims == ("y", "x") and "y" not in result.coords):
        raise UserError(f"{result.probe} result: its {loss!r} has axes {dims}, not a (y, x) grid or an x line with "
                        "coordinates; export a result of `lossatlas surface`")
    x = np.asarray(result.coords["x"], dtype=np.float64)
    y = np.asarray(result.coords["y"], dtype=np.float64) if dims == ("y", "x") else np.zeros(1)
    grids = {}
    for name, arr in result.values.items():
        if tuple(result.dims[name]) == dims and np.asarray(arr).dtype.kind in "biuf":
            grids[name] = np.asarray(arr, dtype=np.float64).reshape(len(y), len(x))
    return x, y, grids, loss


def _points(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The (nx·ny, 3) points of a structured grid in VTK order (x fastest, then y): (x_j, y_i, z[i, j])."""
    xx, yy = np.meshgrid(x, y)  # (ny, nx): row i is y_i
    return np.stack([xx.ravel(), yy.ravel(), z.ravel()], axis=1)


def _vtk_name(name: str) -> str:
    """A point-data array name without the whitespace the legacy format cannot hold."""
    return re.sub(r"\s+", "_", name) or "value"


def to_vtk(surface_result: Any, path: str | Path, *, legacy: bool | None = None) -> Path:
    """Write a surface Result as a VTK structured grid for ParaView; returns the path.

    The grid has nx × ny × 1 points (x, y, L(x, y)) in VTK order (x fastest), the loss as height, and every value on
    the grid (loss, accuracy, extra metrics) as a point-data array of float64. ``path`` ending in ``.vtk`` gives
    the legacy ASCII format (``# vtk DataFile Version 3.0``, ``DATASET STRUCTURED_GRID``); any other suffix the
    XML StructuredGrid format (``.vts``) with base64 binary little-endian arrays (UInt64 byte-count headers),
    which keeps NaN and inf exactly; ``legacy`` (default None: by the suffix) picks one whatever the suffix. A
    non-finite loss is written as it is ("nan", "inf" in ASCII): a point at NaN height is not drawn.
    """
    x, y, grids, loss = _surface_grid(surface_result)
    path = Path(path)
    pts = _points(x, y, grids[loss])
    if legacy if legacy is not None else path.suffix.lower() == ".vtk":
        text = _legacy_vtk(surface_result, x, y, pts, grids)
    else:
        text = _xml_vts(x, y, pts, grids)
    path.write_text(text, encoding="utf-8")
    return path


def _numbers(values: np.ndarray, per_line: int) -> str:
    """Numbers as shortest round-trip text (repr of float64), ``per_line`` to a line."""
    flat = [repr(float(v)) for v in np.asarray(values, dtype=np.float64).ravel()]
    return "\n".join(" ".join(flat[i:i + per_line]) for i in range(0, len(flat), per_line))


def _legacy_vtk(result: Any, x: np.ndarray, y: np.ndarray, pts: np.ndarray, grids: Mapping[str, np.ndarray]) -> str:
    title = f"lossatlas {result.probe} step {result.step}"[:255]  # the header line holds at most 256 characters
    lines = ["# vtk DataFile Version 3.0", title, "ASCII", "DATASET STRUCTURED_GRID",
             f"DIMENSIONS {len(x)} {len(y)} 1", f"POINTS {len(pts)} double", _numbers(pts, 3),
             f"POINT_DATA {len(pts)}"]
    for name, grid in grids.items():
        lines += [f"SCALARS {_vtk_name(name)} double 1", "LOOKUP_TABLE default", _numbers(grid, 6)]
    return "\n".join(lines) + "\n"


def _b64(values: np.ndarray) -> str:
    """A VTK XML binary DataArray: base64 of a UInt64 byte count followed by the little-endian float64 bytes."""
    raw = np.ascontiguousarray(values, dtype="<f8").tobytes()
    return base64.b64encode(np.uint64(len(raw)).astype("<u8").tobytes() + raw).decode("ascii")


def _xml_vts(x: np.ndarray, y: np.ndarray, pts: np.ndarray, grids: Mapping[str, np.ndarray]) -> str:
    extent = f"0 {len(x) - 1} 0 {len(y) - 1} 0 0"
    arrays = "\n".join(f'        <DataArray type="Float64" Name="{_xml_escape(name)}" NumberOfComponents="1" '
                       f'format="binary">{_b64(grid)}</DataArray>' for name, grid in grids.items())
    return ('<?xml version="1.0"?>\n'
            '<VTKFile type="StructuredGrid" version="1.0" byte_order="LittleEndian" header_type="UInt64">\n'
            f'  <StructuredGrid WholeExtent="{extent}">\n'
            f'    <Piece Extent="{extent}">\n'
            '      <PointData>\n'
            f'{arrays}\n'
            '      </PointData>\n'
            '      <Points>\n'
            f'        <DataArray type="Float64" NumberOfComponents="3" format="binary">{_b64(pts)}</DataArray>\n'
            '      </Points>\n'
            '    </Piece>\n'
            '  </StructuredGrid>\n'
            '</VTKFile>\n')


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def to_loss_landscape_h5(surface_result: Any, path: str | Path) -> Path:
    """Write a surface Result as a surface file of Li et al.'s loss-landscape code; returns the path.

    Datasets (the names ``plot_surface.py`` writes and ``plot_1D.py`` / ``plot_2D.py`` / ``h52vtp.py`` read):
    ``xcoordinates`` (nx,) and, for a plane, ``ycoordinates`` (ny,); ``train_loss`` and ``train_acc`` (accuracy
    in percent, as its ``evaluation.eval_loss`` gives it; NaN where the result has no accuracy) of shape
    (nx, ny), or (nx,) for a line, holding the values in its ``numpy.meshgrid(x, y)`` order: the C-order flat
    index iy·nx + ix is L(x_ix, y_iy) (see the module docstring). Every other grid value is written under its
    own name in the same layout.
    """
    from lossatlas.store.h5 import write_plain

    x, y, grids, loss = _surface_grid(surface_result)
    line = tuple(surface_result.dims[loss]) == ("x",)
    shape = (len(x),) if line else (len(x), len(y))
    accuracy = grids.get("accuracy", grids.get("surface_accuracy"))
    arrays = {"xcoordinates": x, **({} if line else {"ycoordinates": y}),
              "train_loss": grids[loss].reshape(shape),  # (ny, nx) C-order bytes seen as (nx, ny): its meshgrid order
              "train_acc": (100.0 * accuracy if accuracy is not None
                            else np.full(len(x) * len(y), np.nan)).reshape(shape)}
    for name, grid in grids.items():
        if name not in (loss, "accuracy", "surface_accuracy") and name not in arrays:
            arrays[name] = grid.reshape(shape)
    return write_plain(path, arrays)


# -- the command ----------------------------------------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``export`` sub-command to ``subparsers`` (an argparse sub-parsers action); returns its parser."""
    p = subparsers.add_parser(
        "export", help="stored results for other tools: netCDF/xarray, VTK for ParaView, loss-landscape HDF5",
        description="Write stored results for other tools. xarray: every configuration (or the one --select names) "
                    "as a netCDF-4 group of the output, one Dataset each (needs `pip install lossatlas[xarray]`). "
                    "vtk: one surface as a VTK structured grid for ParaView (OUT ending in .vtk: legacy ASCII; "
                    ".vts: XML). loss-landscape: one surface as the HDF5 file of Li et al.'s loss-landscape code "
                    "(xcoordinates, ycoordinates, train_loss, train_acc), for its plot_2D.py and plot_1D.py.")
    p.add_argument("run", metavar="RUN", help="a run file (its .results.h5 next to it is read) or a results file")
    p.add_argument("--format", required=True, choices=FORMATS, metavar="xarray|vtk|loss-landscape",
                   help="what to write: xarray (netCDF-4 file of Datasets), vtk (ParaView grid), loss-landscape (HDF5)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the file to write (an existing one is "
                   "refused without --force)")
    p.add_argument("--select", metavar="NAME|LABEL|KEY", help="the configuration to export: its label, its config "
                   "key, or PROBE/KEY as `lossatlas info RESULTS` lists them (needed when several surfaces are stored)")
    p.add_argument("--step", type=int, metavar="N", help="the checkpoint step to export (default: every step for "
                   "xarray, the last stored step for a surface)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=export_command)
    return p


def _choose(configs: list[dict], select: str | None, what: str, path: Path) -> list[dict]:
    """The configurations ``select`` names (all if None); a UserError listing the candidates if it names none.

    The one resolver that ``plot`` and ``report`` use too (``lossatlas.store.labels.choose``).
    """
    from lossatlas.store.labels import choose

    return choose(configs, select, what, path)


def _listing(configs: Iterable[dict]) -> str:
    return ", ".join(f"{c['name']} (steps {_steps_text(c)})" for c in configs) or "none stored"


def _steps_text(c: dict) -> str:
    return " ".join("none" if e["step"] is None else str(e["step"]) for e in c["entries"])


def export_command(args: argparse.Namespace) -> int:
    """``lossatlas export``: write the chosen results in ``args.format`` to ``args.output``; returns 0."""
    from lossatlas.store import written_aside

    out = Path(args.output)
    if out.exists() and not args.force:
        raise UserError(f"{out}: already exists; pass --force to replace it, or another -o")
    if out.is_dir():
        raise UserError(f"{out} is a folder; give a file path for -o")
    path = _results_path(args.run)
    if args.format == "xarray":
        _xarray("--format xarray")
        try:
            import h5netcdf  # noqa: F401  (the netCDF-4 writer xarray uses below)
        except ImportError:
            raise UserError(f"--format xarray needs h5netcdf, which is not installed; {XARRAY_FIX}") from None
        datasets = open_results(path)
        configs = _choose(_configurations(path), args.select, "result", path)
        names = {c["name"] for c in configs}
        chosen = {n: ds for n, ds in datasets.items() if n in names or n.removesuffix("@none") in names}
        if args.step is not None:
            chosen = {n: ds.sel(step=[args.step]) for n, ds in chosen.items()
                      if "step" in ds.dims and args.step in ds["step"].values}
            if not chosen:
                raise UserError(f"--step {args.step}: no chosen result is stored at that step; stored: "
                                f"{_listing(configs)}")
        with written_aside(out, overwrite=args.force) as tmp:
            for i, (name, ds) in enumerate(chosen.items()):
                ds.to_netcdf(tmp, mode="w" if i == 0 else "a", group=name, engine="h5netcdf")
        print(f"wrote {out}: {len(chosen)} dataset(s) as netCDF-4 groups ({', '.join(chosen)})")
        return 0
    configs = _configurations(path, SURFACE_PROBE)
    if not configs:
        raise UserError(f"{path}: no surface stored; compute one first (`lossatlas surface RUN --step last`)")
    chosen = _choose(configs, args.select, "surface", path)
    if len(chosen) > 1:
        raise UserError(f"{len(chosen)} surfaces are stored; pick one with --select: {_listing(chosen)}")
    c = chosen[0]
    steps = [e["step"] for e in c["entries"]]
    step = steps[-1] if args.step is None else args.step
    if step not in steps:
        raise UserError(f"--step {args.step}: {c['name']} is stored at steps {_steps_text(c)}; pick one of them")
    result, info = _read(path, c["probe"], c["key"], step)
    with written_aside(out, overwrite=args.force) as tmp:  # built aside, renamed into place when complete
        if args.format == "vtk":
            to_vtk(result, tmp, legacy=out.suffix.lower() == ".vtk")  # the format of the output's suffix
        else:
            to_loss_landscape_h5(result, tmp)
    partial = " (a partial surface: unevaluated points are NaN)" if info["status"] == "partial" else ""
    print(f"wrote {out}: {c['name']} at step {step} as {args.format}{partial}")
    return 0
