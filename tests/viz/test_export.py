"""Surfaces exported for ParaView (VTK structured grids) and for Li et al.'s loss-landscape plotting scripts, and the
``lossatlas export`` command (lossatlas.export).

The VTK files are parsed back here by a tiny reader of each format; the loss-landscape file is checked against the
index order of that code's own ``scheduler.get_unplotted_indices`` (``numpy.meshgrid(x, y)``, flat index
iy·nx + ix) and the way its ``plot_2D.py`` pairs the array with ``meshgrid(x, y)``.
"""

from __future__ import annotations

import argparse
import base64
import xml.etree.ElementTree as ET

import h5py
import numpy as np
import pytest

from lossatlas.errors import UserError

X = np.linspace(-1.0, 1.0, 4)
Y = np.array([-0.5, 0.0, 0.5])


def landscape(x, y):
    """A closed-form loss surface, not symmetric in x and y (so a transposed grid cannot pass)."""
    return 1.0 + x**2 + 3.0 * y**2 + 0.25 * x * y + 0.1 * x


def surface_result(x=X, y=Y, *, nonfinite=False):
    from lossatlas.probes.base import Result

    xx, yy = np.meshgrid(x, y)  # (ny, nx): Z[i, j] = L(x_j, y_i), the layout the surface probe stores
    loss = landscape(xx, yy)
    if nonfinite:
        loss[0, 0], loss[-1, -1] = np.nan, np.inf
    acc = 1.0 / (1.0 + loss)
    return Result(probe="surface", config={"dims": 2}, step=20,
                  values={"loss": loss, "accuracy": acc, "direction_x": np.ones(5), "direction_y": np.zeros(5)},
                  dims={"loss": ("y", "x"), "accuracy": ("y", "x"), "direction_x": ("param",),
                        "direction_y": ("param",)},
                  coords={"x": x, "y": y})


def line_result():
    from lossatlas.probes.base import Result

    return Result(probe="surface", config={"dims": 1}, step=5, values={"loss": landscape(X, 0.0), "accuracy": X * 0 + 0.5},
                  dims={"loss": ("x",), "accuracy": ("x",)}, coords={"x": X})


# -- tiny VTK readers -------------------------------------------------------------------------------------------
def read_legacy_vtk(path):
    """(dimensions, points (n, 3), {name: point data}) of a legacy ASCII STRUCTURED_GRID file."""
    lines = path.read_text().splitlines()
    assert lines[0] == "# vtk DataFile Version 3.0" and lines[2] == "ASCII" and lines[3] == "DATASET STRUCTURED_GRID"
    tokens = " ".join(lines[4:]).split()
    assert tokens[0] == "DIMENSIONS"
    dims = tuple(int(t) for t in tokens[1:4])
    assert tokens[4] == "POINTS" and tokens[6] == "double"
    n = int(tokens[5])
    pos = 7
    points = np.array([float(t) for t in tokens[pos:pos + 3 * n]]).reshape(n, 3)
    pos += 3 * n
    assert tokens[pos:pos + 2] == ["POINT_DATA", str(n)]
    pos += 2
    data = {}
    while pos < len(tokens):
        assert tokens[pos] == "SCALARS" and tokens[pos + 2:pos + 4] == ["double", "1"]
        assert tokens[pos + 4:pos + 6] == ["LOOKUP_TABLE", "default"]
        data[tokens[pos + 1]] = np.array([float(t) for t in tokens[pos + 6:pos + 6 + n]])
        pos += 6 + n
    return dims, points, data


def decode_binary(text, components):
    raw = base64.b64decode(text.strip())
    nbytes = int(np.frombuffer(raw[:8], "<u8")[0])
    assert nbytes == len(raw) - 8
    return np.frombuffer(raw[8:], "<f8").reshape(-1, components)


def read_vts(path):
    """(extent, points (n, 3), {name: point data}) of an XML StructuredGrid with base64 binary Float64 arrays."""
    root = ET.parse(path).getroot()
    assert root.get("type") == "StructuredGrid" and root.get("header_type") == "UInt64"
    assert root.get("byte_order") == "LittleEndian"
    piece = root.find("StructuredGrid/Piece")
    extent = tuple(int(t) for t in piece.get("Extent").split())
    pts_el = piece.find("Points/DataArray")
    assert pts_el.get("type") == "Float64" and pts_el.get("format") == "binary"
    points = decode_binary(pts_el.text, 3)
    data = {el.get("Name"): decode_binary(el.text, 1)[:, 0] for el in piece.findall("PointData/DataArray")}
    return extent, points, data


def expected_points(x, y, z):
    """VTK's structured order, written out by loops: x fastest, then y."""
    return np.array([[x[j], y[i], z[i, j]] for i in range(len(y)) for j in range(len(x))])


def test_legacy_vtk_parses_back_to_the_grid_and_values(tmp_path):
    from lossatlas.export import to_vtk

    r = surface_result()
    to_vtk(r, tmp_path / "s.vtk")
    dims, points, data = read_legacy_vtk(tmp_path / "s.vtk")
    assert dims == (4, 3, 1) and points.shape == (12, 3)
    want = expected_points(X, Y, landscape(*np.meshgrid(X, Y)))
    np.testing.assert_array_equal(points, want)  # repr() text: every float64 round-trips exactly
    assert set(data) == {"loss", "accuracy"}  # the directions are no grid values
    np.testing.assert_array_equal(data["loss"], want[:, 2])
    np.testing.assert_array_equal(data["accuracy"], 1.0 / (1.0 + want[:, 2]))


def test_xml_vts_keeps_every_bit_including_nan_and_inf(tmp_path):
    from lossatlas.export import to_vtk

    r = surface_result(nonfinite=True)
    to_vtk(r, tmp_path / "s.vts")
    extent, points, data = read_vts(tmp_path / "s.vts")
    assert extent == (0, 3, 0, 2, 0, 0)
    z = r.values["loss"]
    want = expected_points(X, Y, z)
    np.testing.assert_array_equal(points, want)
    assert np.isnan(data["loss"][0]) and data["loss"][-1] == np.inf
    np.testing.assert_array_equal(data["loss"].view(np.uint64), z.ravel().view(np.uint64))
    # the same file written as legacy ASCII whatever the suffix, by the flag
    to_vtk(r, tmp_path / "t.vts", legacy=True)
    _, _, legacy = read_legacy_vtk(tmp_path / "t.vts")
    np.testing.assert_array_equal(legacy["loss"], z.ravel())


def test_a_line_is_a_one_row_grid(tmp_path):
    from lossatlas.export import to_vtk

    to_vtk(line_result(), tmp_path / "l.vtk")
    dims, points, data = read_legacy_vtk(tmp_path / "l.vtk")
    assert dims == (4, 1, 1)
    np.testing.assert_array_equal(points, np.stack([X, np.zeros(4), landscape(X, 0.0)], axis=1))


def test_loss_landscape_h5_has_the_layout_its_plot_scripts_read(tmp_path):
    from lossatlas.export import to_loss_landscape_h5

    r = surface_result()
    to_loss_landscape_h5(r, tmp_path / "surf.h5")
    with h5py.File(tmp_path / "surf.h5", "r") as f:
        assert set(f) == {"xcoordinates", "ycoordinates", "train_loss", "train_acc"}
        x, y = f["xcoordinates"][:], f["ycoordinates"][:]
        loss, acc = f["train_loss"][:], f["train_acc"][:]
    np.testing.assert_array_equal(x, X)
    np.testing.assert_array_equal(y, Y)
    assert loss.shape == acc.shape == (len(X), len(Y))  # (len(x), len(y)), as plot_surface.py's crunch makes it
    # scheduler.get_unplotted_indices: flat index ind is the point (meshgrid(x, y)[0].ravel()[ind], ...[1].ravel()[ind])
    xm, ym = np.meshgrid(x, y)
    for ind in range(loss.size):
        assert loss.ravel()[ind] == landscape(xm.ravel()[ind], ym.ravel()[ind])
        assert acc.ravel()[ind] == 100.0 * (1.0 / (1.0 + landscape(xm.ravel()[ind], ym.ravel()[ind])))  # percent


def test_loss_landscape_square_grid_is_what_plot_2d_draws(tmp_path):
    """plot_2D.plot_2d_contour: X, Y = meshgrid(x, y); Z = f['train_loss'][:] is drawn as Z[i, j] at (X, Y)[i, j]."""
    from lossatlas.export import to_loss_landscape_h5

    grid = np.linspace(-1.0, 1.0, 5)
    to_loss_landscape_h5(surface_result(grid, grid * 0.5), tmp_path / "sq.h5")
    with h5py.File(tmp_path / "sq.h5", "r") as f:
        xm, ym = np.meshgrid(f["xcoordinates"][:], f["ycoordinates"][:])
        np.testing.assert_array_equal(f["train_loss"][:], landscape(xm, ym))


def test_loss_landscape_line(tmp_path):
    from lossatlas.export import to_loss_landscape_h5

    to_loss_landscape_h5(line_result(), tmp_path / "line.h5")
    with h5py.File(tmp_path / "line.h5", "r") as f:
        assert set(f) == {"xcoordinates", "train_loss", "train_acc"}  # plot_1D.plot_1d_loss_err reads these
        np.testing.assert_array_equal(f["train_loss"][:], landscape(X, 0.0))
        np.testing.assert_array_equal(f["train_acc"][:], np.full(4, 50.0))


def test_a_result_without_a_loss_grid_is_refused(tmp_path):
    from lossatlas.export import to_vtk
    from lossatlas.probes.base import Result

    r = Result(probe="hessian", config={}, step=0, values={"top_eigenvalues": np.ones(2)}, dims={"top_eigenvalues": ("k",)})
    with pytest.raises(UserError, match="no loss grid to export"):
        to_vtk(r, tmp_path / "h.vtk")


# -- the command ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_with_surfaces(tmp_path_factory):
    """A tiny run with a 2-D surface and a 1-D line stored at its last step, and a loss at every step."""
    from lossatlas.analysis.runner import RunOptions, default_results_path, run_probe
    from lossatlas.probes.loss import Loss
    from lossatlas.probes.surface import Surface
    from lossatlas.train import TrainConfig, train

    run = tmp_path_factory.mktemp("export") / "run.h5"
    train(TrainConfig(model={"name": "mlp", "kwargs": {"widths": [64, 4, 10]}}, data={"name": "digits"}, lr=0.1,
                      steps=10, batch_size=64, checkpoint_every=5), str(run))
    opts = RunOptions(steps="last", max_examples=64)
    plane = run_probe(run, Surface(dims=2, xrange=(-1.0, 1.0, 4), yrange=(-0.5, 0.5, 3), quadratic_check=False), opts)
    line = run_probe(run, Surface(dims=1, xrange=(-1.0, 1.0, 5), quadratic_check=False), opts)
    run_probe(run, Loss(), RunOptions(steps="all", max_examples=64))
    return run, default_results_path(run), plane.key, line.key


def export(*argv):
    from lossatlas.export import add_parser

    parser = argparse.ArgumentParser(prog="lossatlas")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", *map(str, argv)])
    return args.func(args)


def test_export_command_writes_the_stored_surface(run_with_surfaces, tmp_path, capsys):
    from lossatlas.store import ResultsStore

    run, results, plane, line = run_with_surfaces
    with pytest.raises(UserError, match=r"2 surfaces are stored; pick one with --select: surface · "):
        export(run, "--format", "vtk", "-o", tmp_path / "a.vtk")
    assert export(run, "--format", "vtk", "-o", tmp_path / "a.vtk", "--select", plane) == 0
    assert "surface · xrange=-1,1,4 · yrange=-0.5,0.5,3" in capsys.readouterr().out  # its label
    stored, _ = ResultsStore(results, mode="r").read("surface", plane, 10)
    dims, points, data = read_legacy_vtk(tmp_path / "a.vtk")
    assert dims == (4, 3, 1)
    np.testing.assert_array_equal(data["loss"], stored.values["loss"].ravel())
    np.testing.assert_array_equal(points, expected_points(stored.coords["x"], stored.coords["y"], stored.values["loss"]))
    # never over an existing file without --force; then replaced
    with pytest.raises(UserError, match=r"a.vtk: already exists; pass --force"):
        export(results, "--format", "vtk", "-o", tmp_path / "a.vtk", "--select", f"surface/{line}")
    assert export(results, "--format", "vtk", "-o", tmp_path / "a.vtk", "--select", f"surface/{line}", "--force") == 0
    assert read_legacy_vtk(tmp_path / "a.vtk")[0] == (5, 1, 1)
    with pytest.raises(UserError, match=r"--step 3: surface · .* is stored at steps 10; pick one of them"):
        export(run, "--format", "loss-landscape", "-o", tmp_path / "b.h5", "--select", plane, "--step", "3")
    with pytest.raises(UserError, match=r"--select 'nope' names no stored surface"):
        export(run, "--format", "loss-landscape", "-o", tmp_path / "b.h5", "--select", "nope")
    assert not (tmp_path / "b.h5").exists()
    assert export(run, "--format", "loss-landscape", "-o", tmp_path / "b.h5", "--select", plane, "--step", "10") == 0
    with h5py.File(tmp_path / "b.h5", "r") as f:
        assert f["train_loss"].shape == (4, 3)
        np.testing.assert_array_equal(f["train_loss"][:].ravel(), stored.values["loss"].ravel())
        np.testing.assert_array_equal(f["train_acc"][:].ravel(), 100.0 * stored.values["accuracy"].ravel())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.vtk", "b.h5"]  # no temporaries left


def test_export_command_xarray_writes_netcdf_groups(run_with_surfaces, tmp_path):
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    import lossatlas

    run, results, plane, _ = run_with_surfaces
    out = tmp_path / "all.nc"
    assert export(run, "--format", "xarray", "-o", out) == 0
    sets = lossatlas.open_results(results)
    assert len(sets) == 3
    for name, ds in sets.items():
        with xr.open_dataset(out, group=name, engine="h5netcdf") as back:
            for v in ds.data_vars:
                np.testing.assert_array_equal(back[v].values, ds[v].values)
            np.testing.assert_array_equal(back["step"].values, ds["step"].values)
    loss_name = next(n for n, ds in sets.items() if ds.attrs["probe"] == "loss")  # named by its label
    one = tmp_path / "one.nc"
    assert export(run, "--format", "xarray", "-o", one, "--select", loss_name, "--step", "5") == 0
    with xr.open_dataset(one, group=loss_name, engine="h5netcdf") as back:
        assert list(back["step"].values) == [5]
        assert float(back["loss"][0]) == float(sets[loss_name]["loss"].sel(step=5))
    with pytest.raises(UserError, match="already exists; pass --force"):
        export(run, "--format", "xarray", "-o", one)
