"""Results files read by the labelled-array ecosystem: every group a netCDF-4 group (xarray + h5netcdf), and
``lossatlas.open_results`` (lossatlas.store.results, lossatlas.export).

A results file made by running the probes on a tiny run must open group by group with xarray, holding exactly the
numbers lossatlas's own reader gives; files written before every axis had a dimension scale (tests/data) still read
and verify.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from lossatlas.errors import UserError

xr = pytest.importorskip("xarray")
pytest.importorskip("h5netcdf")

DATA = Path(__file__).resolve().parents[1] / "data"
OLD = DATA / "results_v1.results.h5"
sys.path.insert(0, str(DATA))
from make_results_v1 import SYNTHETIC_KEY, synthetic_results  # noqa: E402

TINY_MLP = {"name": "mlp", "kwargs": {"widths": [64, 6, 10]}}


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """A tiny run with hessian (+ per-layer blocks), surface (2-D and 1-D), interpolate, collapse, sharpness, loss."""
    from lossatlas.analysis.runner import RunOptions, default_results_path, run_probe
    from lossatlas.probes.collapse import NeuralCollapse
    from lossatlas.probes.connectivity import Interpolate
    from lossatlas.probes.hessian import HessianProbe
    from lossatlas.probes.loss import Loss
    from lossatlas.probes.sharpness import Sharpness
    from lossatlas.probes.surface import Surface
    from lossatlas.train import TrainConfig, train

    run = tmp_path_factory.mktemp("xarray") / "run.h5"
    train(TrainConfig(model=TINY_MLP, data={"name": "digits"}, lr=0.1, steps=10, batch_size=64, checkpoint_every=5),
          str(run))
    for probe, steps in [
        (HessianProbe(top_k=2, bottom_k=1, density=True, num_probes=1, num_steps=8, blocks="layers", block_k=1), "last"),
        (Surface(dims=2, xrange=(-1.0, 1.0, 4), yrange=(-0.5, 0.5, 3), quadratic_check=False), "last"),
        (Surface(dims=1, xrange=(-1.0, 1.0, 5), quadratic_check=False), "last"),
        (Interpolate(to_step=10, alphas=(0.0, 1.0, 5)), [0]),
        (NeuralCollapse(layers="depth"), "last"),
        (Sharpness(measures=("grad_norm", "sam"), max_examples=64), "last"),
        (Loss(), "all"),
    ]:
        run_probe(run, probe, RunOptions(steps=steps, max_examples=128))
    return run, default_results_path(run)


def group_paths(path: Path) -> list[str]:
    """Every /<probe>/<key>/<step> group of a results file."""
    with h5py.File(path, "r") as f:
        return [f"{p}/{k}/{s}" for p in f for k in f[p] for s in f[p][k]]


def assert_group_matches(ds, result) -> None:
    """The xarray view of a group holds exactly the Result's values and coords, every axis named."""
    assert not [d for d in ds.dims if str(d).startswith("phony_dim")], f"unnamed axes in {result.probe}: {ds.dims}"
    assert set(ds.variables) == set(result.values) | set(result.coords)
    for name, arr in [*result.values.items(), *result.coords.items()]:
        got = ds[name].values
        # strings come back as numpy str (an index) or as objects holding str (a variable)
        assert got.shape == arr.shape and got.dtype.kind in ("UO" if arr.dtype.kind == "U" else arr.dtype.kind), name
        np.testing.assert_array_equal(got.astype(arr.dtype), arr, err_msg=name)
    for name, dims in result.dims.items():
        # each axis keeps its lossatlas name, or <name>_<value> where a same-named axis has another length
        assert all(d == want or d.startswith(f"{want}_") for d, want in zip(ds[name].dims, dims)), (name, ds[name].dims)
        for axis, dim in enumerate(dims):
            if dim in result.coords:  # a labelled axis: its coordinate is the index of the xarray dimension
                np.testing.assert_array_equal(ds[name][ds[name].dims[axis]].values.astype(result.coords[dim].dtype),
                                              result.coords[dim])


def test_every_group_of_a_probed_run_opens_with_xarray_and_equals_the_store(probed):
    from lossatlas.store import ResultsStore

    _, results = probed
    store = ResultsStore(results, mode="r")
    checks = store.verify()
    assert checks and all(c["status"] == "ok" for c in checks)
    probes = {c["probe"] for c in checks}
    assert {"hessian", "hessian_blocks", "surface", "interpolate", "collapse", "sharpness", "loss"} <= probes
    paths = group_paths(results)
    assert len(paths) == len(checks)
    for c in checks:
        result, _ = store.read(c["probe"], c["key"], c["step"])
        group = f"{c['probe']}/{c['key']}/{'none' if c['step'] is None else format(c['step'], '010d')}"
        with xr.open_dataset(results, engine="h5netcdf", group=group) as ds:
            assert_group_matches(ds.load(), result)
    with h5py.File(results, "r") as f:
        assert int(f.attrs["format_version"]) == 2
    if hasattr(xr, "open_datatree"):  # the whole file at once, every group a node
        tree = xr.open_datatree(results, engine="h5netcdf")
        assert {node.path.lstrip("/") for node in tree.subtree if node.has_data} == set(paths)


def test_half_labelled_and_clashing_axes_are_named_by_dimension_scales(tmp_path):
    """A value with a coordinate on one axis only (hessian_blocks' (block, k)) broke xarray on the whole file; two
    axes named "k" of other lengths, a value named like an axis, a 2-D coord, bools, strings and an empty axis."""
    from lossatlas.probes.base import Result
    from lossatlas.store import ResultsStore

    r = Result(probe="synthetic", config={"flag": True, "nested": {"a": [1, None]}}, step=3,
               values={"top": np.array([3.0, 2.0]), "bottom": np.array([-1.0, -2.0, -3.0]),
                       "blocks": np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
                       "converged": np.array([True, False]), "kind": np.array(["a", "bé", "c"]),
                       "k": np.int64(2), "empty": np.zeros((0, 2)), "scalar": np.float32(1.5)},
               dims={"top": ("k",), "bottom": ("k",), "blocks": ("block", "k"), "converged": ("k",),
                     "kind": ("block",), "empty": ("none", "k")},
               coords={"block": np.array(["layers.0", "layers/1", "head"]), "grid2d": np.arange(6.0).reshape(2, 3)})
    path = tmp_path / "r.results.h5"
    ResultsStore(path).write(r, key="key/with%slash")
    back, _ = ResultsStore(path, mode="r").read("synthetic", "key/with%slash", 3)
    assert back.dims == r.dims and set(back.values) == set(r.values) and set(back.coords) == set(r.coords)
    for name in r.values:
        assert back.values[name].dtype == r.values[name].dtype
        np.testing.assert_array_equal(back.values[name], r.values[name])
    np.testing.assert_array_equal(back.coords["grid2d"], r.coords["grid2d"])
    (group,) = group_paths(path)
    with xr.open_dataset(path, engine="h5netcdf", group=group) as ds:
        assert_group_matches(ds.load(), r)
        assert ds["converged"].dtype == bool  # uint8 + dtype="bool", decoded by xarray's CF conventions
        # the value "k" holds the name, so the axis "k" of 2 points is "k_top" (the first value that has it), and
        # the other length of "k" is "k_bottom"; the half-labelled "blocks" has both axes named
        assert ds["top"].dims == ("k_top",) and ds["blocks"].dims == ("block", "k_top")
        assert ds["converged"].dims == ("k_top",) and ds["empty"].dims == ("none", "k_top")
        assert ds["bottom"].dims == ("k_bottom",) and ds.sizes["k_bottom"] == 3 and ds.sizes["k_top"] == 2
        assert ds["k"].dims == () and int(ds["k"]) == 2


def test_open_results_gives_labelled_datasets(probed):
    import lossatlas
    from lossatlas.store import ResultsStore

    run, results = probed
    sets = lossatlas.open_results(run)
    store = ResultsStore(results, mode="r")
    from lossatlas.store.labels import configurations

    # each configuration under its readable label (the store writes one with every entry), unique in the file
    assert set(sets) == {c["name"] for c in configurations(store.entries())}
    assert {ds.attrs["key"] for ds in sets.values()} == {e["key"] for e in store.entries()}
    for name, ds in sets.items():
        probe, key = ds.attrs["probe"], ds.attrs["key"]
        entries = sorted(e["step"] for e in store.entries(probe) if e["key"] == key)
        np.testing.assert_array_equal(ds["step"].values, entries)
        assert ds.attrs["probe"] == probe and ds.attrs["key"] == key
        for i, step in enumerate(entries):
            result, info = store.read(probe, key, step)
            assert ds["status"].values[i] == info["status"]
            for v, arr in result.values.items():
                np.testing.assert_array_equal(ds[v].isel(step=i).values, arr, err_msg=f"{name} {v}")
            for c, arr in result.coords.items():
                if c in ds.indexes:
                    np.testing.assert_array_equal(ds[c].values, arr)
    hessian = next(ds for ds in sets.values() if ds.attrs["probe"] == "hessian")
    assert hessian["top_eigenvalues"].dims == ("step", "k") and hessian.attrs["top_k"] == 2
    assert hessian["bottom_eigenvalues"].dims == ("step", "k_bottom_eigenvalues")
    assert hessian.attrs["density"] == "true"  # a bool setting as JSON: netCDF attributes hold no bools
    blocks = next(ds for ds in sets.values() if ds.attrs["probe"] == "hessian_blocks")
    assert len(blocks["block"]) == 2 and all(isinstance(b, str) and b for b in blocks["block"].values.tolist())
    assert blocks["block_top_eigenvalues"].dims == ("step", "block", "k")
    plane = next(ds for ds in sets.values() if ds.attrs["probe"] == "surface" and ds.attrs["dims"] == 2)
    np.testing.assert_allclose(plane["x"].values, np.linspace(-1.0, 1.0, 4), rtol=0, atol=1e-15)
    np.testing.assert_allclose(plane["y"].values, np.linspace(-0.5, 0.5, 3), rtol=0, atol=1e-15)
    assert plane["loss"].dims == ("step", "y", "x")
    loss = next(ds for ds in sets.values() if ds.attrs["probe"] == "loss")
    assert list(loss["step"].values) == [0, 5, 10] and loss["loss"].dims == ("step",)
    for ds in sets.values():  # each Dataset is itself netCDF-writable (attrs of netCDF types)
        ds.to_netcdf(run.parent / "roundtrip.nc", engine="h5netcdf", mode="w")
        with xr.open_dataset(run.parent / "roundtrip.nc", engine="h5netcdf") as back:
            xr.testing.assert_identical(back.load().drop_encoding() if hasattr(back, "drop_encoding") else back, ds)


def test_open_results_stacks_steps_padding_what_differs(tmp_path):
    """A grid that changes between steps becomes <dim>_by_step; shorter arrays and missing values are NaN."""
    from lossatlas.export import to_dataset
    from lossatlas.probes.base import Result

    a = Result(probe="p", config={"k": 2}, step=0, values={"density": np.array([1.0, 2.0, 3.0]), "n": np.int64(4),
                                                          "top": np.array([5.0, 4.0])},
               dims={"density": ("grid",), "top": ("k",)}, coords={"grid": np.array([0.0, 0.5, 1.0])})
    b = Result(probe="p", config={"k": 2}, step=7, values={"density": np.array([9.0, 8.0]), "top": np.array([6.0, 1.0])},
               dims={"density": ("grid",), "top": ("k",)}, coords={"grid": np.array([0.0, 2.0])})
    ds = to_dataset([a, b])
    np.testing.assert_array_equal(ds["step"].values, [0, 7])
    np.testing.assert_array_equal(ds["density"].values, [[1.0, 2.0, 3.0], [9.0, 8.0, np.nan]])
    np.testing.assert_array_equal(ds["grid_by_step"].values, [[0.0, 0.5, 1.0], [0.0, 2.0, np.nan]])
    assert ds["grid_by_step"].dims == ("step", "grid") and "grid" not in ds.indexes
    np.testing.assert_array_equal(ds["n"].values, [4.0, np.nan])  # missing at step 7: int promoted to hold NaN
    np.testing.assert_array_equal(ds["top"].values, [[5.0, 4.0], [6.0, 1.0]])


def test_results_files_from_before_dimension_scales_still_read_and_verify(tmp_path):
    """tests/data/results_v1.results.h5 was written by the code before this layout (see make_results_v1.py)."""
    import lossatlas
    from lossatlas.probes.base import Result
    from lossatlas.store import ResultsStore

    old = tmp_path / "old.results.h5"
    shutil.copyfile(OLD, old)
    with h5py.File(old, "r") as f:
        assert int(f.attrs["format_version"]) == 1
    with pytest.raises(ValueError, match="mixing of labeled and unlabeled"):  # what broke xarray on old files
        xr.open_dataset(old, engine="h5netcdf", group=f"hessian_blocks/{SYNTHETIC_KEY}/0000000005")
    store = ResultsStore(old, mode="r")
    checks = store.verify()
    assert len(checks) == 9 and all(c["status"] == "ok" for c in checks), checks
    for want in synthetic_results():
        got, info = store.read(want.probe, SYNTHETIC_KEY, want.step)
        assert info["elapsed_s"] == 1.5 and got.config == want.config and got.meta == want.meta
        assert got.dims == want.dims and set(got.values) == set(want.values) and set(got.coords) == set(want.coords)
        for name in want.values:
            assert got.values[name].dtype == want.values[name].dtype
            np.testing.assert_array_equal(got.values[name], want.values[name])
        for name in want.coords:
            np.testing.assert_array_equal(got.coords[name], want.coords[name])
    sets = lossatlas.open_results(old)
    blocks = sets[f"hessian_blocks/{SYNTHETIC_KEY}"]
    assert list(blocks["block"].values) == ["layers.0", "layers.2", "head/out"]
    np.testing.assert_array_equal(blocks["block_top_eigenvalues"].isel(step=0).values,
                                  [[4.0, 1.5], [0.25, 0.125], [3.0, -1.0]])
    track = sets[f"track/{SYNTHETIC_KEY}"]
    assert "step" not in track.dims and track["eigenvalues"].dims == ("checkpoint", "k")
    # a new result in an old file: the old entries still verify, the new group is netCDF-4, the header says so
    fresh = Result(probe="loss", config={}, step=10, values={"loss": np.float64(0.25), "per_class": np.ones(3)},
                   dims={"per_class": ("class",)})
    ResultsStore(old).write(fresh, key="new")
    assert all(c["status"] == "ok" for c in ResultsStore(old, mode="r").verify())
    with xr.open_dataset(old, engine="h5netcdf", group="loss/new/0000000010") as ds:
        assert ds["per_class"].dims == ("class",) and float(ds["loss"]) == 0.25
    with h5py.File(old, "r") as f:
        assert int(f.attrs["format_version"]) == 2


def test_a_results_file_from_a_newer_lossatlas_is_refused(tmp_path):
    from lossatlas.store import ResultsStore

    path = tmp_path / "new.results.h5"
    shutil.copyfile(OLD, path)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 3
    with pytest.raises(UserError, match=r"newer lossatlas \(format_version 3, this one reads 2\); upgrade"):
        ResultsStore(path, mode="r")


def test_open_results_without_xarray_says_how_to_install_it(monkeypatch, probed):
    from lossatlas.export import open_results

    monkeypatch.setitem(sys.modules, "xarray", None)  # import xarray raises ImportError
    with pytest.raises(UserError) as e:
        open_results(probed[1])
    assert "pip install lossatlas[xarray]" in str(e.value) and "\n" not in str(e.value)


def test_importing_lossatlas_and_open_results_does_not_import_xarray_or_torch():
    code = ("import sys, lossatlas; f = lossatlas.open_results; import lossatlas.export; "
            "print(sorted(m for m in ('xarray', 'torch', 'h5netcdf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
