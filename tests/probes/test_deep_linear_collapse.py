"""Neural collapse in deep linear networks (Dang et al. 2023): closed-form GOF geometry and the per-layer probe.

References: (i) the theorem's root equation b/n_k = M x^{M−1}/(x^M+1)² holds at every positive x_k; (ii) the
closed-form minimizer built from ``minimizer_geometry`` has zero gradient of the regularised MSE objective and its
loss equals the closed-form f*; (iii) a dense grid minimisation of each per-class objective; (iv) L-BFGS in
float64 from a random start reaches the same loss and geometry; (v) the ``collapse`` probe with ``layers="all"``
on an exact orthogonal frame gives 0 for NC1, NC2, NC3 and the OF distance at every layer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lossatlas.probes.base import ProbeContext
from lossatlas.probes.collapse import NeuralCollapse, downstream_products
from lossatlas.probes.deep_linear import class_objective, gof_roots, layer_frame_metrics, minimizer_geometry

DT = torch.float64


def objective(h: torch.Tensor, ws: list[torch.Tensor], y: torch.Tensor, lw: float, lh: float) -> torch.Tensor:
    """1/(2N) Σ||W_M⋯W_1 h_i − e_{y_i}||² + λ_W/2 Σ||W_m||² + λ_H/2 ||H||² (rows of h are the h_i)."""
    out = h
    for w in ws:
        out = out @ w.T
    target = nn.functional.one_hot(y, ws[-1].shape[0]).to(DT)
    n = h.shape[0]
    return ((out - target) ** 2).sum() / (2 * n) + lw / 2 * sum((w**2).sum() for w in ws) + lh / 2 * (h**2).sum()


def labels_for(counts: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=DT))
    return q


def closed_form_point(counts, m: int, d: int, lw: float, lh: float):
    """H (N, d) and W_1..W_M built from the closed form: W_m = U_m diag(s) U_{m−1}ᵀ, U_M = I_C, h_i = a_k u_{0,k}."""
    geo = minimizer_geometry(counts, m, lw, lh)
    c = len(counts)
    us = [orthonormal(d, c, seed) for seed in range(m)] + [torch.eye(c, dtype=DT)]
    s = torch.diag(torch.as_tensor(geo["s"], dtype=DT))
    ws = [us[i + 1] @ s @ us[i].T for i in range(m)]
    y = labels_for(counts)
    h = us[0][:, y].T * torch.as_tensor(geo["feature_norm"], dtype=DT)[y, None]
    return geo, h, ws, y


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_root_equation_and_grid_minimum(m):
    counts, lw, lh = [40, 20, 10, 5, 2], 2e-3, 1e-3
    n = np.asarray(counts, float)
    total = n.sum()
    x = gof_roots(counts, m, lw, lh)
    b = m * total * (total * lw**m * lh) ** (1 / m)
    pos = x > 0
    assert pos.any()
    lhs = m * x[pos] ** (m - 1) / (x[pos] ** m + 1) ** 2
    np.testing.assert_allclose(lhs, b / n[pos], rtol=1e-9)
    geo = minimizer_geometry(counts, m, lw, lh)
    grid = np.linspace(0, 3, 300001)  # brute force: each per-class objective on a dense grid
    for k, n_k in enumerate(n):
        g = class_objective(grid, n_k, total, m, lw, lh)
        assert float(class_objective(geo["s"][k], n_k, total, m, lw, lh)) <= g.min() + 1e-12
        assert abs(geo["s"][k] - grid[g.argmin()]) < 1e-4


def test_minority_collapse_to_zero():
    # strong regularisation: the smallest class's objective is lowest at s = 0, the others keep a positive root
    counts, m, lw, lh = [50, 50, 1], 2, 2e-2, 2e-2
    geo = minimizer_geometry(counts, m, lw, lh)
    assert geo["x"][2] == 0.0 and geo["s"][2] == 0.0 and geo["feature_norm"][2] == 0.0
    assert np.all(geo["s"][:2] > 0.1)
    total = sum(counts)
    grid = np.linspace(0, 3, 100001)
    assert np.argmin(class_objective(grid, 1, total, m, lw, lh)) == 0


@pytest.mark.parametrize("counts,m", [([6, 6, 3, 3, 1], 3), ([5, 5, 5, 5], 2), ([9, 4, 2], 1)])
def test_closed_form_point_is_stationary(counts, m):
    lw, lh = 5e-3, 5e-3
    geo, h, ws, y = closed_form_point(counts, m, 7, lw, lh)
    params = [h.clone().requires_grad_(), *[w.clone().requires_grad_() for w in ws]]
    loss = objective(params[0], params[1:], y, lw, lh)
    grads = torch.autograd.grad(loss, params)
    assert float(loss.detach()) == pytest.approx(geo["loss"], rel=1e-12)
    assert max(float(g.abs().max()) for g in grads) < 1e-12
    means = torch.stack([h[y == k].mean(0) for k in range(len(counts))])
    for layer in range(1, m + 1):
        prod = ws[-1]
        for w in reversed(ws[layer - 1:-1]):
            prod = prod @ w
        feats = means
        for w in ws[:layer - 1]:
            feats = feats @ w.T
        metrics = layer_frame_metrics(prod, feats, geo, layer)
        assert max(metrics.values()) < 1e-12, metrics


def test_trained_minimizer_matches_closed_form():
    counts, m, d, lw, lh = [6, 3, 3, 1], 2, 6, 5e-3, 5e-3
    y = labels_for(counts)
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(len(y), d, generator=g, dtype=DT).mul(0.5).requires_grad_()]
    params += [torch.randn(d if i < m - 1 else len(counts), d, generator=g, dtype=DT).mul(0.5).requires_grad_()
               for i in range(m)]
    opt = torch.optim.LBFGS(params, lr=1, max_iter=3000, tolerance_grad=1e-12, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(params[0], params[1:], y, lw, lh)
        loss.backward()
        return loss

    opt.step(closure)
    geo = minimizer_geometry(counts, m, lw, lh)
    h, ws = params[0].detach(), [p.detach() for p in params[1:]]
    assert float(objective(h, ws, y, lw, lh)) == pytest.approx(geo["loss"], rel=1e-8)
    means = torch.stack([h[y == k].mean(0) for k in range(len(counts))])
    within = max(float((h[y == k] - means[k]).norm(dim=1).max()) for k in range(len(counts)))
    assert within < 1e-5  # NC1
    for layer in (1, 2):
        prod = ws[1] if layer == 2 else ws[1] @ ws[0]
        feats = means if layer == 1 else means @ ws[0].T
        metrics = layer_frame_metrics(prod, feats, geo, layer)
        assert max(metrics.values()) < 1e-4, metrics


def ufm_model(h: torch.Tensor, ws: list[torch.Tensor]) -> nn.Sequential:
    """Sequential(Linear(N, d) holding Hᵀ, W_1, …, W_M), fed one-hot sample indicators: an unconstrained-features net."""
    layers = [nn.Linear(h.shape[0], h.shape[1], bias=False)]
    layers[0].weight.data = h.T.clone()
    for w in ws:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w.clone()
        layers.append(lin)
    return nn.Sequential(*layers).to(DT)


def test_probe_all_layers_on_orthogonal_frame():
    counts, m = [4, 4, 4], 3
    geo, h, ws, y = closed_form_point(counts, m, 5, 1e-2, 1e-2)
    model = ufm_model(h, ws)
    x = torch.eye(len(y), dtype=DT)
    res = NeuralCollapse(layers="all").run(ProbeContext(model=model, data=[(x, y)]))
    names = list(res.coords["layer"]) if hasattr(res, "coords") else None
    v = res.values
    assert v["layer_nc1"].shape == (m + 1,)
    if names is not None:
        assert [str(n) for n in names] == [str(i) for i in range(m + 1)]
    for key in ("layer_nc1", "layer_nc2_equinorm_means", "layer_nc2_equiangular_means", "layer_nc2_etf_means",
                "layer_of_means", "layer_nc2_equinorm_weights", "layer_nc3_uncentred"):
        np.testing.assert_allclose(v[key][1:], 0.0, atol=1e-10, err_msg=key)
    # the first Linear's input is the one-hot sample indicator: its within-class spread is orthogonal to the
    # class-mean span, so pinv NC1 is 0 there too, while the quotient variant would not be
    assert abs(v["layer_nc1"][0]) < 1e-12
    # centred NC3 of an orthogonal frame is not 0: W rows ∝ uncentred means, ||u − (u − ū)||² ≠ 0
    assert np.all(v["layer_nc3_self_duality"][1:] > 1e-3)


def test_downstream_products_chain_and_break():
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False), nn.Linear(5, 2))
    prods = downstream_products(model, ["0", "1", "2"], None)
    assert prods["2"].shape == (2, 5)
    assert prods["1"] is None and prods["0"] is None  # 2 → 5 does not chain
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    prods = downstream_products(model, ["0", "1"], None)
    torch.testing.assert_close(prods["0"], (model[1].weight @ model[0].weight).detach().to(DT))
