"""The convexity map of the surface probe (Li, Xu, Taylor, Studer, Goldstein 2018, "Visualizing the Loss Landscape of
Neural Nets", section 6): λ_max, λ_min and |λ_min/λ_max| of the Hessian at grid points θ* + α d_x + β d_y, against a
dense float64 Hessian's eigen-decomposition at every point (tests/reference.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DIGITS, TINY_MLP

from lossatlas.api import surface
from lossatlas.cli import main
from lossatlas.models import build_model
from lossatlas.probes.convexity import ShiftedNegation, extreme_eigenvalues, map_axes
from lossatlas.probes.surface import Surface
from lossatlas.store import ResultsStore

from reference import eigenvalues, hessian


def _dense_extremes(model, batches, res, alpha, beta):
    """(λ_min, λ_max) of the dense float64 Hessian over every parameter at θ* + α d_x + β d_y."""
    names, shapes = res.meta["param_names"], res.meta["param_shapes"]
    params = dict(model.named_parameters())
    dx, dy = (torch.as_tensor(res.values[k], dtype=torch.float64) for k in ("direction_x", "direction_y"))
    point, i = {}, 0
    for k, s in zip(names, shapes):  # θ(α, β), parameter by parameter, from the flat directions
        n = int(np.prod(s))
        point[k] = params[k].detach() + alpha * dx[i:i + n].reshape(s) + beta * dy[i:i + n].reshape(s)
        i += n
    ev = eigenvalues(hessian(model, batches, "cross_entropy", mode="eval", point=point))
    return float(ev[0]), float(ev[-1])


def _mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(24, 5, dtype=torch.float64), torch.arange(24) % 3
    return model, x, y


def _cnn():
    torch.manual_seed(1)  # Li et al.'s no-short ResNet in miniature: BatchNorm (eval statistics), no shortcut
    model = build_model({"name": "resnet", "kwargs": {"widths": [2], "blocks_per_stage": 1, "skip": False,
                                                      "image_size": 4}}).double().eval()
    x, y = torch.randn(12, 16, dtype=torch.float64), torch.arange(12) % 10
    return model, x, y


@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_map_equals_the_dense_hessian_at_every_grid_point(make):
    model, x, y = make()
    P = sum(p.numel() for p in model.parameters())
    res = surface(model, (x, y), xrange=(-1.0, 1.0, 5), batch_size=None, convexity=True, convexity_stride=2,
                  convexity_tol=1e-10, convexity_max_iter=P)
    cx, cy = res.coords["cx"], res.coords["cy"]
    np.testing.assert_array_equal(cx, [-1.0, 0.0, 1.0])  # every 2nd point of the 5-point axis
    np.testing.assert_array_equal(cy, [-1.0, 0.0, 1.0])
    assert res.dims["convexity_ratio"] == ("cy", "cx") and res.values["convexity_ratio"].shape == (3, 3)
    for i, beta in enumerate(cy):
        for j, alpha in enumerate(cx):
            lo, hi = _dense_extremes(model, [(x, y)], res, float(alpha), float(beta))
            spread = hi - lo
            assert res.values["convexity_lambda_max"][i, j] == pytest.approx(hi, abs=1e-7 * spread)
            assert res.values["convexity_lambda_min"][i, j] == pytest.approx(lo, abs=1e-7 * spread)
            assert res.values["convexity_ratio"][i, j] == pytest.approx(abs(lo / hi), rel=1e-6, abs=1e-9)
    assert res.values["convexity_converged"].all()
    meta = res.meta["convexity"]
    assert meta["stride"] == 2 and meta["matvecs"] > 0
    assert meta["mean_ratio"] == pytest.approx(float(np.mean(res.values["convexity_ratio"])), rel=1e-12)


def test_default_tolerance_bounds_the_error_as_documented():
    """tol = 1e-2: λ_max within 1e-2·|λ_max| and λ_min within 1e-2·(λ_max − λ_min) of the dense Hessian's."""
    model, x, y = _cnn()
    res = surface(model, (x, y), xrange=(-1.0, 1.0, 3), batch_size=None, convexity=True, convexity_stride=1)
    assert res.meta["convexity"]["tol"] == 1e-2 and res.meta["convexity"]["max_iter"] == 100
    for i, beta in enumerate(res.coords["cy"]):
        for j, alpha in enumerate(res.coords["cx"]):
            lo, hi = _dense_extremes(model, [(x, y)], res, float(alpha), float(beta))
            assert abs(res.values["convexity_lambda_max"][i, j] - hi) <= 1e-2 * abs(hi)
            assert abs(res.values["convexity_lambda_min"][i, j] - lo) <= 1e-2 * (hi - lo)


def test_extreme_eigenvalues_of_a_nearly_convex_spectrum():
    """λ_min ≈ 0 (a locally convex point): the shifted run gets it to tol·(λ_max − λ_min), not tol·|λ_min|."""
    lam = torch.cat([torch.tensor([-1e-3]), torch.linspace(0.0, 1.0, 150, dtype=torch.float64)[1:], torch.tensor([20.0])])
    lam = lam.to(torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    A = Q @ torch.diag(lam) @ Q.T
    e = extreme_eigenvalues(A, tol=1e-3, max_iter=150)
    assert e["lambda_max"] == pytest.approx(20.0, rel=1e-3)
    assert abs(e["lambda_min"] - (-1e-3)) <= 1e-3 * (20.0 + 1e-3)
    assert e["ratio"] == pytest.approx(abs(e["lambda_min"]) / e["lambda_max"], rel=1e-12) and e["ratio"] < 2e-3
    assert e["converged"] and 0 < e["matvecs"] <= 300
    B = ShiftedNegation(A, 3.0)  # 3·I − A
    v = torch.randn(len(lam), dtype=torch.float64)
    torch.testing.assert_close(B @ v, 3.0 * v - A @ v, rtol=0, atol=0)


def test_a_line_gets_a_one_dimensional_map_and_axes_subsample_the_grid():
    model, x, y = _mlp()
    res = surface(model, (x, y), dims=1, xrange=(-1.0, 1.0, 7), batch_size=None, convexity=True,
                  convexity_stride=3, convexity_tol=1e-10, convexity_max_iter=100)
    assert res.dims["convexity_lambda_max"] == ("cx",)
    np.testing.assert_array_equal(res.coords["cx"], [-1.0, 0.0, 1.0])
    d = torch.as_tensor(res.values["direction_x"], dtype=torch.float64)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for j, alpha in enumerate(res.coords["cx"]):
        point, i = {}, 0
        for k, p in model.named_parameters():
            point[k] = (theta + float(alpha) * d)[i:i + p.numel()].reshape(p.shape)
            i += p.numel()
        ev = eigenvalues(hessian(model, [(x, y)], "cross_entropy", point=point))
        assert res.values["convexity_lambda_max"][j] == pytest.approx(float(ev[-1]), rel=1e-7)
        assert res.values["convexity_lambda_min"][j] == pytest.approx(float(ev[0]), rel=1e-6, abs=1e-9)
    cx, cy = map_axes(np.linspace(-1, 1, 51), np.linspace(-2, 2, 51), 5)
    assert len(cx) == len(cy) == 11 and cx[5] == 0.0 and cy[-1] == 2.0
    assert map_axes(np.arange(4.0), None, 2)[1] is None


def test_settings_are_checked_and_part_of_the_cache_key():
    assert Surface().config_hash() != Surface(convexity=True).config_hash()
    assert Surface(convexity=True).config_hash() != Surface(convexity=True, convexity_stride=2).config_hash()
    for bad in ({"convexity_stride": 0}, {"convexity_tol": 0.0}, {"convexity_tol": 2.0},
                {"convexity_max_iter": 1}, {"convexity": True, "dir_type": "states"}):
        with pytest.raises(ValueError, match="convexity"):
            Surface(**bad)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from lossatlas.train import TrainConfig, train

    path = tmp_path_factory.mktemp("convexity") / "run.h5"
    train(TrainConfig(model=TINY_MLP, data=DIGITS, lr=0.05, steps=10, batch_size=32, checkpoint_every=10), str(path))
    return path


def test_cli_writes_the_map_and_refuses_bad_settings_in_one_line(run, capsys):
    argv = ["surface", str(run), "--xrange", "-1", "1", "5", "--convexity", "--convexity-stride", "2",
            "--convexity-max-iter", "40", "--max-examples", "32", "--json", "--quiet"]
    capsys.readouterr()
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    (entry,) = data["steps"]
    ratio = entry["values"]["convexity_ratio"]
    assert ratio["dims"] == ["cy", "cx"] and ratio["shape"] == [3, 3]
    assert entry["coords"]["cx"]["data"] == [-1.0, 0.0, 1.0]
    found = ResultsStore(run.with_suffix(".results.h5"), mode="r").read("surface", data["key"], 10)
    res = found[0]
    lam_max, lam_min = res.values["convexity_lambda_max"], res.values["convexity_lambda_min"]
    np.testing.assert_allclose(res.values["convexity_ratio"], np.abs(lam_min / lam_max), rtol=1e-12)
    assert np.all(lam_max > 0) and np.all(lam_min <= lam_max)
    assert res.config["convexity"] is True and res.config["convexity_stride"] == 2
    for flag, value in (("--convexity-stride", "0"), ("--convexity-tol", "1.5")):
        capsys.readouterr()
        code = main(["surface", str(run), "--xrange", "-1", "1", "3", "--convexity", flag, value,
                     "--max-examples", "32", "--quiet"])
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if line]
        assert code == 2 and len(lines) == 1 and "convexity" in lines[0] and "Traceback" not in err, err


def test_figures_draw_the_map_beside_the_contours():
    from matplotlib.collections import QuadMesh

    from lossatlas.viz.interactive import surface_figures
    from lossatlas.viz.landscape import surface_figure

    model, x, y = _mlp()
    res = surface(model, (x, y), xrange=(-1.0, 1.0, 5), batch_size=None, convexity=True, convexity_stride=2,
                  convexity_max_iter=60)
    fig = surface_figure(res)
    contour_ax, map_ax = fig.axes[0], fig.axes[1]  # the two panels; then their colour bars
    mesh = next(c for c in map_ax.collections if isinstance(c, QuadMesh))
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(3, 3), res.values["convexity_ratio"], rtol=1e-12)
    assert "convexity" in map_ax.get_title() and "surface" in contour_ax.get_title()
    plain = surface(model, (x, y), xrange=(-1.0, 1.0, 5), batch_size=None)
    assert len(surface_figure(plain).axes) == 2  # the contours and their colour bar only
    figs = surface_figures([res])
    heat = figs[1].data[0]
    np.testing.assert_allclose(np.asarray(heat.z, dtype=float), res.values["convexity_ratio"], rtol=1e-12)
    assert surface_figures([plain])[1] is None
