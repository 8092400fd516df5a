"""The convexity map of experiments/skip_connections.py (Li, Xu, Taylor, Studer, Goldstein 2018, "Visualizing the
Loss Landscape of Neural Nets"): |λ_min/λ_max| of the Hessian at θ + α d_x + β d_y against a dense float64 Hessian."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_experiments import load

from lossatlas.api import surface
from lossatlas.models import build_model

skip = load("skip_connections")


def _dense_extremes(model, x, y, flat_point, names, shapes):
    """λ_min, λ_max of the dense Hessian (float64, torch.autograd.functional.hessian) at a flat parameter vector."""
    base = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def loss(flat):
        params, i = {}, 0
        for k, s in zip(names, shapes):
            n = int(np.prod(s))
            params[k] = flat[i:i + n].reshape(s)
            i += n
        rest = {k: v.detach() for k, v in base.items() if k not in params}
        out = torch.func.functional_call(model, {**rest, **params, **buffers}, (x,))
        return torch.nn.functional.cross_entropy(out, y)

    H = torch.autograd.functional.hessian(loss, flat_point)
    ev = torch.linalg.eigvalsh((H + H.T) / 2)
    return float(ev[0]), float(ev[-1])


def test_convexity_map_matches_the_dense_hessian():
    torch.manual_seed(0)
    model = build_model({"name": "resnet", "kwargs": {"widths": [2], "blocks_per_stage": 1, "skip": False,
                                                      "image_size": 4}}).double().eval()
    x, y = torch.randn(12, 16, dtype=torch.float64), torch.arange(12) % 10
    res = surface(model, (x, y), xrange=(-1.0, 1.0, 3), batch_size=None)
    names, shapes = res.meta["param_names"], res.meta["param_shapes"]
    P = sum(int(np.prod(s)) for s in shapes)
    coords = np.array([-0.5, 0.5])
    cv = skip.convexity_map(model, (x, y), res, coords, iters=P)
    theta = torch.cat([dict(model.named_parameters())[k].detach().reshape(-1) for k in names])
    dx, dy = (torch.as_tensor(res.values[k], dtype=torch.float64) for k in ("direction_x", "direction_y"))
    for i, beta in enumerate(coords):
        for j, alpha in enumerate(coords):
            lo, hi = _dense_extremes(model, x, y, theta + alpha * dx + beta * dy, names, shapes)
            # Lanczos stops at a 1e-2 relative residual r: the Ritz value is within ~r²/gap, ≈1e-5 relative here
            assert cv["lambda_max"][i, j] == pytest.approx(hi, rel=1e-4, abs=1e-9)
            assert cv["lambda_min"][i, j] == pytest.approx(lo, rel=1e-4, abs=1e-9)
            assert cv["ratio"][i, j] == pytest.approx(abs(lo / hi), rel=2e-4)
    # the model's weights are back at θ* afterwards
    torch.testing.assert_close(torch.cat([dict(model.named_parameters())[k].detach().reshape(-1) for k in names]),
                               theta, rtol=0, atol=0)
    assert cv["mean_ratio"] == pytest.approx(float(np.mean(cv["ratio"])), rel=1e-12)


def test_roughness_is_zero_on_a_log_linear_surface_and_the_laplacian_otherwise():
    a = np.linspace(-1, 1, 7)
    X, Y = np.meshgrid(a, a)
    assert skip.roughness(np.exp(2 * X - Y + 1)) == pytest.approx(0.0, abs=1e-12)
    h = a[1] - a[0]
    # log L = X² + Y²: the 5-point Laplacian is exactly 4h² at every interior point
    assert skip.roughness(np.exp(X**2 + Y**2)) == pytest.approx(4 * h**2, rel=1e-10)
