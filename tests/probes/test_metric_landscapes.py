"""Landscapes in accuracy and user metrics, worst-case directions and basin radii, against exact references.

- worst-case directions (projected gradient ascent in a ball) on a quadratic loss L = ½ δᵀHδ: the top
  eigenvectors of H (closed form), and L at the ascent's end point = ½ λ₁ R²;
- the basin radius along a unit eigenvector of a quadratic: √(2·tol/λ) on both sides;
- accuracy and a user metric on a 2-D slice and along an interpolation: brute force at every grid point.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import lossatlas
from lossatlas.probes.directions import worst_case_directions
from lossatlas.probes.surface import basin_radius

import reference as ref

DT = torch.float64


def _quadratic_case(seed: int = 0, n: int = 40, p: int = 5):
    """A linear model at the minimum of L(w) = ½ mean_i (xᵢᵀ(w − w*))²: H = XᵀX/N, top eigenpairs by eigh."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(p, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, p, generator=g, dtype=DT))
    X = torch.randn(n, p, generator=g, dtype=DT) * torch.linspace(0.5, 2.0, p, dtype=DT)  # a spread spectrum
    Y = X @ model.weight.detach().T  # the residuals vanish at w: a minimum, gradient 0
    H = X.T @ X / n
    evals, evecs = torch.linalg.eigh(H)
    return model, X, Y, evals.flip(0), evecs.flip(1)


def test_worst_case_directions_are_the_top_eigenvectors_of_a_quadratic():
    model, X, Y, lam, U = _quadratic_case()
    data = [(X[:17], Y[:17]), (X[17:], Y[17:])]  # unequal batches: weights 17/40 and 23/40
    radius = 0.1
    dirs = worst_case_directions(model, data, "half_sse", k=2, radius=radius, steps=150, seed=3)
    w = model.weight.detach().reshape(-1)
    for j, d in enumerate(dirs):
        v = d.tensors["weight"].reshape(-1)
        assert abs(float(v.norm()) - float(w.norm())) <= 1e-12 * float(w.norm())  # a filter-normalised direction's norm
        cos = float(v @ U[:, j]) / float(v.norm())
        assert abs(abs(cos) - 1.0) < 1e-9, (j, cos)
    # the ascent's end point θ + radius·d₁ has L = ½ λ₁ R², R = radius·‖θ‖ (the maximum over the ball)
    d1 = dirs[0].tensors["weight"]
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.weight.add_(radius * d1)
    got = ref.loss_value(moved, data, "half_sse")
    want = 0.5 * float(lam[0]) * (radius * float(w.norm())) ** 2
    assert abs(got - want) <= 1e-9 * want


def test_worst_surface_rises_faster_than_random():
    model, X, Y, lam, _ = _quadratic_case(seed=1)
    kw = dict(dims=1, xrange=(-0.2, 0.2, 5), batch_size=16, quadratic_check=False)
    worst = lossatlas.surface(model, (X, Y), "half_sse", directions="worst", worst_steps=100, **kw)
    rand = lossatlas.surface(model, (X, Y), "half_sse", directions="random", **kw)
    # same norm ‖d‖ = ‖θ‖: the worst direction's curvature is λ₁‖θ‖², the largest possible
    w2 = float(model.weight.detach().norm()) ** 2
    np.testing.assert_allclose(worst.values["loss"], 0.5 * float(lam[0]) * w2 * worst.coords["x"] ** 2, rtol=1e-8)
    assert rand.values["loss"][-1] < worst.values["loss"][-1]


def test_basin_radius_equals_the_closed_form_along_an_eigenvector():
    model, X, Y, lam, _ = _quadratic_case(seed=2)
    tol = 0.05
    res = lossatlas.surface(model, (X, Y), "half_sse", dims=1, directions="eigenvectors", xrange=(-1, 1, 21),
                            basin_tolerance=tol, quadratic_check=False, batch_size=16)
    want = math.sqrt(2 * tol / float(lam[0]))  # ½ λ₁ r² = tol along the unit top eigenvector
    assert 0.05 < want < 1.0  # inside the grid: a real crossing, refined by bisection
    np.testing.assert_allclose(res.values["basin_radius"], [[want, want]], rtol=1e-9)
    assert not res.values["basin_censored"].any()
    assert res.meta["basin"]["metric"] == "loss"


def test_basin_radius_of_a_falling_metric_and_a_censored_side():
    f = lambda a: 0.9 - 4.0 * a**2 if a < 0 else 0.9 - 0.0 * a  # accuracy-like: falls only on the left  # noqa: E731
    a = np.linspace(-0.5, 0.5, 11)
    out = basin_radius(f, a, np.array([f(t) for t in a]), 0.9, 0.01, worse=-1)
    np.testing.assert_allclose(out["radius"], [math.sqrt(0.01 / 4.0), 0.5], rtol=1e-9)
    assert out["censored"].tolist() == [False, True]  # the right side never worsens: at least the grid edge


def _mlp_case(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 3)).to(DT)
    X = torch.randn(50, 4, dtype=DT)
    y = torch.randint(0, 3, (50,))
    return model, X, y


def _margin(out: torch.Tensor, y: torch.Tensor) -> float:
    """A user metric: the mean logit margin of the label over the best other class."""
    picked = out.gather(1, y[:, None]).squeeze(1)
    other = out.scatter(1, y[:, None], -torch.inf).max(dim=1).values
    return float((picked - other).mean())


def _at(model: nn.Module, moves: list[tuple[float, dict[str, torch.Tensor]]]) -> nn.Module:
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for c, d in moves:
            for n, p in moved.named_parameters():
                p.add_(c * d[n])
    return moved


def _brute(model: nn.Module, batches) -> tuple[float, float]:
    """(accuracy, Σ_b (n_b/N) margin_b) by plain evaluation."""
    n = sum(len(y) for _, y in batches)
    with torch.no_grad():
        margin = sum(len(y) / n * _margin(model(x), y) for x, y in batches)
    return ref.accuracy(model, batches), margin


def test_accuracy_and_metric_slice_equal_brute_force():
    model, X, y = _mlp_case()
    res = lossatlas.surface(model, (X, y), xrange=(-1.5, 1.5, 4), yrange=(-1, 1, 3), batch_size=16,
                            metric_fns={"margin": _margin}, metrics=("mse",), quadratic_check=False)
    names = res.meta["param_names"]
    like = dict(model.named_parameters())
    dx = ref.unflatten(model, torch.as_tensor(res.values["direction_x"]), names)
    dy = ref.unflatten(model, torch.as_tensor(res.values["direction_y"]), names)
    assert set(dx) == set(like)
    batches = [(X[i:i + 16], y[i:i + 16]) for i in range(0, 50, 16)]  # 16, 16, 16, 2
    acc = np.zeros((3, 4))
    margin = np.zeros((3, 4))
    for i, b in enumerate(res.coords["y"]):
        for j, a in enumerate(res.coords["x"]):
            acc[i, j], margin[i, j] = _brute(_at(model, [(a, dx), (b, dy)]), batches)
    np.testing.assert_array_equal(res.values["accuracy"], acc)
    np.testing.assert_allclose(res.values["margin"], margin, rtol=1e-10, atol=1e-12)
    assert len(np.unique(acc)) > 1  # the slice does move the accuracy
    assert res.config["metric_fns"] == ["margin"]


def test_interpolation_in_a_user_metric_equals_brute_force():
    model_a, X, y = _mlp_case(0)
    model_b, _, _ = _mlp_case(1)
    res = lossatlas.interpolate(model_a, model_b, (X, y), alphas=(0, 1, 5), batch_size=16, metric_fns={"margin": _margin})
    pa, pb = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    d = {n: (pb[n] - pa[n]).detach() for n in pa}
    batches = [(X[i:i + 16], y[i:i + 16]) for i in range(0, 50, 16)]
    want = np.array([_brute(_at(model_a, [(a, d)]), batches) for a in res.coords["alpha"]])
    np.testing.assert_array_equal(res.values["accuracy"], want[:, 0])
    np.testing.assert_allclose(res.values["margin"], want[:, 1], rtol=1e-10, atol=1e-12)


def test_bad_metric_settings_are_refused():
    model, X, y = _mlp_case()
    with pytest.raises(lossatlas.errors.UserError, match="metric"):
        lossatlas.surface(model, (X, y), xrange=(-1, 1, 3), metric_fns={"loss": _margin})
    with pytest.raises(lossatlas.errors.UserError, match="basin_metric"):
        lossatlas.surface(model, (X, y), xrange=(-1, 1, 3), basin_tolerance=0.1, basin_metric="nope")
    with pytest.raises(lossatlas.errors.UserError, match="worst_radius"):
        lossatlas.surface(model, (X, y), xrange=(-1, 1, 3), directions="worst", worst_radius=-1.0)


def test_trajectory_reports_registered_metrics(tiny_run, tmp_path):
    from lossatlas.analysis.runner import RunOptions, run_probe
    from lossatlas.probes import get_probe

    res = run_probe(tiny_run, get_probe("trajectory")(metrics=("top5_accuracy", "cross_entropy")),
                    RunOptions(steps="last", batch_size=200, max_examples=300,
                               results_path=str(tmp_path / "r.h5"))).results[-1]
    # the final checkpoint projects onto itself: the metric at its projection is its true value
    np.testing.assert_allclose(res.values["cross_entropy_at_projection"][-1], res.values["cross_entropy"][-1], rtol=1e-6)
    np.testing.assert_allclose(res.values["cross_entropy"], res.values["loss"], rtol=1e-6)  # the same loss, as a metric
    assert (res.values["top5_accuracy"] >= res.values["accuracy"] - 1e-12).all()
    assert (res.values["top5_accuracy"] <= 1.0).all() and res.values["top5_accuracy"][-1] > res.values["accuracy"][-1]
