"""Landscape probes: directions, surfaces, interpolation/barriers, trajectory PCA."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lossatlas.probes.base import ProbeContext, get_probe
from lossatlas.probes.connectivity import Interpolate, barriers, interpolation_curve, layerwise_barriers
from lossatlas.probes.directions import (
    checkpoint_direction,
    checkpoint_plane,
    cosine,
    eigenvector_directions,
    flatten,
    normalize_direction,
    random_direction,
    trajectory_pca,
)
from lossatlas.probes.grid import PointEvaluator, evaluate_grid, grid_points, points_for_rank
from lossatlas.probes.surface import Surface, directional_derivatives, quadratic_regime
from lossatlas.probes.trajectory import Trajectory

import reference

DT = torch.float64


def _slices(t: torch.Tensor, axis: int) -> torch.Tensor:
    return t.movedim(axis, 0).reshape(t.shape[axis], -1).norm(dim=1)


class Zoo(nn.Module):
    """One layer of every kind the filter-normalisation rules name (never run forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.deconv = nn.ConvTranspose2d(4, 5, 3)
        self.emb = nn.Embedding(7, 6)
        self.attn = nn.MultiheadAttention(6, 2)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 3)


def _mlp_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(DT)
    with torch.no_grad():  # non-trivial running statistics
        m.train()
        for _ in range(3):
            m(torch.randn(16, 4, dtype=DT) * 2 + 1)
    return m


def _cls_data(n: int = 30, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=DT)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[:12], y[:12]), (x[12:], y[12:])]  # unequal batches


# ---------------------------------------------------------------------------------------------- filter normalisation
def test_filter_normalization_per_filter_and_rules():
    """Li et al. 2018: ‖d_i‖ = ‖w_i‖ per filter; the rule names the axis; biasbn zero; ConvTranspose on dim 1."""
    m = Zoo().to(DT)
    d = random_direction(m)
    w = dict(m.named_parameters())
    for name, axis in [("conv.weight", 0), ("fc.weight", 0), ("emb.weight", 0), ("attn.in_proj_weight", 0),
                       ("attn.out_proj.weight", 0), ("deconv.weight", 1)]:
        torch.testing.assert_close(_slices(d.tensors[name], axis), _slices(w[name], axis), rtol=1e-6, atol=0)
        assert d.rules[name] == f"filter(dim{axis})"
    # ConvTranspose: the dim-0 slices are NOT normalised (the original code's rule would make them so)
    assert not torch.allclose(_slices(d.tensors["deconv.weight"], 0), _slices(w["deconv.weight"], 0), rtol=1e-3)
    for name in ["conv.bias", "bn.weight", "bn.bias", "ln.weight", "ln.bias", "fc.bias", "attn.in_proj_bias"]:
        assert torch.equal(d.tensors[name], torch.zeros_like(w[name])) and d.rules[name] == "zero(biasbn)"
    assert not any("running" in k for k in d.tensors)  # buffers untouched by default

    inc = random_direction(m, ignore="none")
    for name in ["conv.bias", "bn.weight", "ln.bias", "fc.bias"]:
        assert torch.equal(inc.tensors[name], w[name].detach()) and inc.rules[name] == "copy(w)"
    torch.testing.assert_close(inc.tensors["conv.weight"], d.tensors["conv.weight"], rtol=0, atol=0)  # same seed


def test_direction_norms_states_seed_and_errors():
    m = Zoo().to(DT)
    w = dict(m.named_parameters())
    lay = random_direction(m, norm="layer")
    torch.testing.assert_close(lay.tensors["fc.weight"].norm(), w["fc.weight"].norm(), rtol=1e-8, atol=0)
    dfl = random_direction(m, norm="dfilter")
    torch.testing.assert_close(_slices(dfl.tensors["deconv.weight"], 1), torch.ones(5, dtype=DT), rtol=1e-8, atol=0)
    raw = random_direction(m, norm="none")
    wt = random_direction(m, norm="weight")
    torch.testing.assert_close(wt.tensors["conv.weight"], raw.tensors["conv.weight"] * w["conv.weight"])
    st = random_direction(m, dir_type="states")
    assert st.rules["bn.running_mean"] == "zero(biasbn)" and st.rules["bn.num_batches_tracked"] == "zero(integer)"
    assert torch.equal(random_direction(m, seed=5).flat(), random_direction(m, seed=5).flat())
    assert not torch.equal(random_direction(m, seed=5).flat(), random_direction(m, seed=6).flat())
    with pytest.raises(ValueError, match="unknown norm 'filtr'"):
        random_direction(m, norm="filtr")
    with pytest.raises(ValueError, match="unknown ignore"):
        normalize_direction(raw.tensors, w, ignore="bias")
    with pytest.raises(ValueError, match="unknown dir_type"):
        random_direction(m, dir_type="state")


def test_checkpoint_directions_cosine_and_given_vectors():
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(3, 4, generator=g, dtype=DT), "n": torch.tensor(3)}
    b = {"w": torch.randn(3, 4, generator=g, dtype=DT), "n": torch.tensor(9)}
    c = {"w": torch.randn(3, 4, generator=g, dtype=DT), "n": torch.tensor(1)}
    d = checkpoint_direction(a, b)
    assert torch.equal(d.tensors["w"], b["w"] - a["w"]) and torch.equal(d.tensors["n"], torch.tensor(0))
    dx, dy = checkpoint_plane(a, b, c, orthogonalize=True)
    assert abs(cosine(dx, dy)) < 1e-12
    u, v = (b["w"] - a["w"]).ravel().numpy(), (c["w"] - a["w"]).ravel().numpy()
    dx, dy = checkpoint_plane(a, b, c)
    assert cosine(dx, dy) == pytest.approx(u @ v / np.linalg.norm(u) / np.linalg.norm(v), rel=1e-12)
    params = {"p": torch.zeros(2, 3, dtype=DT), "q": torch.zeros(4, dtype=DT)}
    mat = torch.randn(10, 2, generator=g, dtype=DT)
    from_mat = eigenvector_directions(mat, params)
    from_dict = eigenvector_directions(from_mat[1].tensors, params)[0]
    assert torch.equal(flatten(from_dict, ["p", "q"]), mat[:, 1])
    with pytest.raises(ValueError, match="flat vector of 10 entries"):
        eigenvector_directions(torch.zeros(9), params)


# ---------------------------------------------------------------------------------------------- surface of a quadratic
def _quadratic_problem():
    """Linear model without bias, half_sse, y = 0: L(w) = ½ wᵀAw with A = XᵀX/N (exact quadratic)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 4, generator=g, dtype=DT) * torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=DT)
    data = [(x[:8], torch.zeros(8, 1, dtype=DT)), (x[8:], torch.zeros(12, 1, dtype=DT))]
    model = nn.Linear(4, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.zero_()  # θ* = 0, the minimum
    a, u = np.linalg.eigh((x.T @ x / 20).numpy())
    return model, data, a[::-1], u[:, ::-1]


def test_quadratic_surface_exact_and_xy_indexing():
    """Surface = ½(a₁x² + a₂y²) with raw orthonormal eigen-directions; Z[i, j] = L(x_j, y_i), nx=5, ny=7."""
    model, data, a, u = _quadratic_problem()
    params = dict(model.named_parameters())
    d1, d2 = eigenvector_directions(torch.as_tensor(u[:, :2].copy()), params)
    x, y = np.linspace(-1, 1, 5), np.linspace(-2, 1, 7)
    ev = PointEvaluator(model, {}, [d1, d2], data, "half_sse")
    out, done = evaluate_grid(ev, grid_points(x, y), chunk_size=4)
    Z = out["loss"].reshape(7, 5)
    ref = 0.5 * (a[0] * x[None, :] ** 2 + a[1] * y[:, None] ** 2)
    np.testing.assert_allclose(Z, ref, rtol=1e-10, atol=1e-13)
    assert done.all()

    # the probe with top Hessian eigenvectors: same closed form, labelled axes, quadratic report ratio 1
    r = Surface(directions="eigenvectors", xrange=(-1, 1, 5), yrange=(-2, 1, 7)).run(ProbeContext(model=model, data=data, loss="half_sse"))
    assert r.values["loss"].shape == (7, 5) and r.dims["loss"] == ("y", "x") and r.meta["indexing"] == "xy"
    np.testing.assert_allclose(r.values["loss"], ref, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(r.coords["y"], y)
    for axis, a_k in (("x", a[0]), ("y", a[1])):
        q = r.meta["quadratic"][axis]
        assert q["ratio"] == pytest.approx(1.0, abs=1e-8)
        assert q["hessian_curvature"] == pytest.approx(a_k, rel=1e-8)
    assert (r.meta["quadratic"]["x"]["alpha_min"], r.meta["quadratic"]["x"]["alpha_max"]) == (-1.0, 1.0)


def test_quadratic_regime_on_a_quartic_line():
    """L(α) = α² + α⁴: dᵀHd = 2, the fitted curvature exceeds it; |L − α²| ≤ 0.1 L ⇔ α² ≤ 1/9."""
    alphas = np.linspace(-1, 1, 41)
    rep = quadratic_regime(alphas, alphas**2 + alphas**4, 0.0, 0.0, 2.0)
    assert rep["ratio"] > 1.5
    inside = alphas[alphas**2 <= 1 / 9 + 1e-12]
    assert (rep["alpha_min"], rep["alpha_max"]) == (inside.min(), inside.max())


def test_directional_derivatives_match_dense_hessian():
    model = _mlp_bn()
    model.eval()
    data = _cls_data()
    params = {k: v.detach() for k, v in model.named_parameters()}
    d = random_direction(model, ignore="none", norm="none", seed=2).tensors
    v = torch.cat([d[k].reshape(-1) for k in params])
    H = reference.hessian(model, data, "cross_entropy")
    g = reference.gradient(model, data, "cross_entropy")
    val, gd, dhd = directional_derivatives(model, params, d, data, "cross_entropy")
    assert val == pytest.approx(reference.loss_value(model, data, "cross_entropy"), rel=1e-12)
    assert gd == pytest.approx(float(g @ v), rel=1e-10)
    assert dhd == pytest.approx(float(v @ H @ v), rel=1e-10)


# ---------------------------------------------------------------------------------------------- engine
def test_vmapped_chunks_equal_per_point_and_are_reproducible():
    model, data = _mlp_bn(), _cls_data()
    dirs = [random_direction(model, seed=s) for s in (1, 2)]
    pts = grid_points(np.linspace(-1, 1, 4), np.linspace(-0.5, 1, 3))
    loop, _ = evaluate_grid(PointEvaluator(model, {}, dirs, data, "cross_entropy", vectorize=False), pts, chunk_size=5)
    for c in (1, 4, 7):
        ev = PointEvaluator(model, {}, dirs, data, "cross_entropy")
        vm, _ = evaluate_grid(ev, pts, chunk_size=c)
        assert ev.vectorized_ok
        np.testing.assert_allclose(vm["loss"], loop["loss"], rtol=1e-12, atol=0)
        np.testing.assert_array_equal(vm["accuracy"], loop["accuracy"])
        again, _ = evaluate_grid(PointEvaluator(model, {}, dirs, data, "cross_entropy"), pts, chunk_size=c)
        assert np.array_equal(again["loss"], vm["loss"])  # same partition: same bits
    # brute force at one point: a deepcopy with the parameters loaded
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        for k, p in ref.named_parameters():
            p.copy_(p + pts[5, 0] * dirs[0].tensors[k] + pts[5, 1] * dirs[1].tensors[k])
        want = reference.loss_value(ref, data, "cross_entropy")
    assert loop["loss"][5] == pytest.approx(want, rel=1e-13)


def test_points_for_rank_partitions_the_grid():
    parts = [points_for_rank(11, r, 3) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(11))
    np.testing.assert_array_equal(parts[1], [1, 4, 7, 10])
    with pytest.raises(ValueError, match="rank < world_size"):
        points_for_rank(11, 3, 3)


def test_bn_recompute_equals_deepcopy_brute_force():
    model, data = _mlp_bn(), _cls_data()
    d = random_direction(model, seed=4)
    alphas = np.array([-1.0, 0.0, 0.7])
    rec = PointEvaluator(model, {}, [d], data, "cross_entropy", bn="recompute", bn_data=data[:1]).evaluate(alphas[:, None])
    keep = PointEvaluator(model, {}, [d], data, "cross_entropy").evaluate(alphas[:, None])
    assert np.abs(rec["loss"] - keep["loss"]).min() > 1e-4
    for i, a in enumerate(alphas):
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for k, p in ref.named_parameters():
                p.add_(a * d.tensors[k])
            ref[1].reset_running_stats()
            ref[1].momentum = None
            ref.train()
            ref(data[0][0])
            ref.eval()
            want = reference.loss_value(ref, data, "cross_entropy")
        assert rec["loss"][i] == pytest.approx(want, rel=1e-12)


def test_user_model_untouched():
    model, data = _mlp_bn(), _cls_data()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = ProbeContext(model=model, data=data, loss="cross_entropy")
    Surface(dims=1, xrange=(-1, 1, 4), bn="recompute").run(ctx)
    Surface(xrange=(-1, 1, 3), dir_type="states", ignore="none").run(ctx)
    assert all(m.training for m in model.modules())
    assert model[1].momentum == 0.1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------------------------------------- resume
def test_surface_resume_is_bitwise_equal_to_uninterrupted():
    model, data = _mlp_bn(), _cls_data()
    probe = Surface(xrange=(-1, 1, 5), yrange=(-1, 1, 6), chunk_size=3, save_every=4, metrics=("mse",))
    calls = []
    hook = model[3].register_forward_hook(lambda *a: calls.append(1))
    full = probe.run(ProbeContext(model=model, data=data, loss="cross_entropy", step=7))
    n_full, calls[:] = len(calls), []
    saved = []

    def save(result):
        saved.append(result)
        if len(saved) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        probe.run(ProbeContext(model=model, data=data, loss="cross_entropy", step=7, save_partial=save))
    part = saved[-1]
    assert part.meta["status"] == "partial" and 0 < part.values["done"].sum() < 30
    assert np.isnan(part.values["loss"][~part.values["done"]]).all()
    calls[:] = []
    resumed = probe.run(ProbeContext(model=model, data=data, loss="cross_entropy", step=7, partial=part))
    hook.remove()
    assert part.values["done"].sum() == 12  # saved after chunks 2 and 4 (3 points each, save_every=4)
    assert len(calls) == n_full - 4 * 2  # the 4 done chunks (2 batches each) are not recomputed
    assert resumed.meta["status"] == "complete" and "done" not in resumed.values
    for k in ("loss", "accuracy", "mse", "direction_x", "direction_y"):
        assert np.array_equal(resumed.values[k], full.values[k]), k
    assert resumed.meta["rules_x"]["0.weight"] == "filter(dim0)" and abs(resumed.meta["cosine"]) < 0.9
    # a partial of another config is not reused
    other = Surface(xrange=(-1, 1, 5), yrange=(-1, 1, 6), chunk_size=3, save_every=4, seed=9)
    fresh = other.run(ProbeContext(model=model, data=data, loss="cross_entropy", partial=part))
    assert not np.array_equal(fresh.values["direction_x"], full.values["direction_x"])


def test_probe_settings_are_validated():
    assert get_probe("surface") is Surface and get_probe("interpolate") is Interpolate and get_probe("trajectory") is Trajectory
    with pytest.raises(ValueError, match="dims must be 1 or 2"):
        Surface(dims=3)
    with pytest.raises(ValueError, match="unknown bn 'recalc'"):
        Surface(bn="recalc")
    with pytest.raises(ValueError, match="unknown directions"):
        Surface(directions="hessian")
    with pytest.raises(ValueError, match="xrange must be"):
        Surface(xrange=(-1, 1))
    with pytest.raises(ValueError, match="needs x_step"):
        Surface(directions="checkpoints")
    with pytest.raises(ValueError, match="unknown loss"):
        Surface(metrics=("hinge",))
    with pytest.raises(ValueError, match="needs to_step"):
        Interpolate()
    with pytest.raises(ValueError, match="grid must be"):
        Trajectory(grid=1)


# ---------------------------------------------------------------------------------------------- barriers
class Scalar(nn.Module):
    """f(x) = θ² − 1 for every example, so mse against 0 gives L(θ) = (θ² − 1)²."""

    def __init__(self, theta: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([theta], dtype=DT))

    def forward(self, x):
        return (self.theta**2 - 1) * torch.ones(x.shape[0], 1, dtype=DT)


def test_double_well_barrier_is_one_at_half():
    """L = (θ² − 1)², θ₁ = −1, θ₂ = 1: barrier 1 at α = ½ under both definitions."""
    model = Scalar(-1.0)
    data = [(torch.zeros(4, 1, dtype=DT), torch.zeros(4, 1, dtype=DT))]
    alphas = np.linspace(0, 1, 31)
    curve = interpolation_curve(model, {"theta": torch.tensor([-1.0], dtype=DT)}, {"theta": torch.tensor([1.0], dtype=DT)}, alphas, data, "mse")
    np.testing.assert_allclose(curve["loss"], ((2 * alphas - 1) ** 2 - 1) ** 2, atol=1e-14)
    b = barriers(alphas, curve["loss"])
    assert b["linear"] == pytest.approx(1.0, abs=1e-14) and b["midpoint"] == pytest.approx(1.0, abs=1e-14)
    assert b["argmax_linear"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="α = 0 and α = 1"):
        barriers(np.linspace(0.1, 1, 5), np.zeros(5))


def test_convex_regression_has_no_linear_barrier_and_probe_stores_both():
    """Linear regression (convex L): Entezari barrier ≤ 0; the probe stores both definitions."""
    torch.manual_seed(5)
    model = nn.Linear(3, 2).to(DT)
    x = torch.randn(25, 3, dtype=DT)
    data = [(x, torch.randn(25, 2, dtype=DT))]
    other = {k: v + torch.randn_like(v) for k, v in model.state_dict().items()}
    ctx = ProbeContext(model=model, data=data, loss="mse", step=1, steps=[1, 2], state_at=lambda s: other)
    r = Interpolate(to_step=2).run(ctx)
    assert r.values["loss"].shape == (31,) and r.dims["loss"] == ("alpha",)
    assert r.scalar("loss_barrier") <= 1e-12
    b = barriers(r.coords["alpha"], r.values["loss"])
    assert r.scalar("loss_endpoint_mean_barrier") == b["endpoint_mean"] and r.scalar("loss_barrier") == b["chord"]
    ends = PointEvaluator(model, other, [], data, "mse").evaluate(np.zeros((1, 0)))["loss"][0]
    assert r.values["loss"][-1] == pytest.approx(ends, rel=1e-12)
    plot = Interpolate(to_step=2, alphas=(-0.5, 1.5, 9)).run(ctx)  # α = 0, 0.25, ..., 1 inside: barrier on them
    inside = (plot.coords["alpha"] >= 0) & (plot.coords["alpha"] <= 1)
    assert plot.scalar("loss_barrier") == barriers(plot.coords["alpha"][inside], plot.values["loss"][inside])["linear"]
    no_ends = Interpolate(to_step=2, alphas=(-0.5, 1.5, 8)).run(ctx)
    assert "loss_barrier" not in no_ends.values and no_ends.values["loss"].shape == (8,)


# ---------------------------------------------------------------------------------------------- layer-wise barriers
def test_deep_linear_layerwise_barriers():
    """3-layer linear net, MSE: every single-layer barrier ≤ 1e-10, the full path's barrier > 0."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False)).to(DT)
    x = torch.randn(30, 3, dtype=DT)
    with torch.no_grad():
        data = [(x, model(x))]  # θ_a fits exactly
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    end = dict(start, **{"0.weight": -start["0.weight"], "1.weight": -start["1.weight"]})  # same function
    alphas = np.linspace(0, 1, 11)
    full = barriers(alphas, interpolation_curve(model, start, end, alphas, data, "mse")["loss"])
    assert full["linear"] > 1e-2
    table = layerwise_barriers(model, start, end, alphas, data, "mse")
    assert table["groups"] == ["0", "1", "2"]
    assert (table["single"]["loss_barrier"] <= 1e-10).all()
    assert table["last"]["loss_barrier"][-1] == pytest.approx(full["linear"], rel=1e-10)
    assert table["first"]["loss_barrier"][1] == pytest.approx(full["linear"], rel=1e-10)  # layer 2 does not move
    ctx = ProbeContext(model=model, data=data, loss="mse", step=0, state_at=lambda s: end)
    r = Interpolate(to_step=1, alphas=(0, 1, 11), layerwise=True).run(ctx)
    np.testing.assert_allclose(r.values["single_loss_barrier"], table["single"]["loss_barrier"], rtol=0, atol=0)
    assert r.dims["single_loss"] == ("group", "alpha") and r.meta["groups"] == ["0", "1", "2"]


# ---------------------------------------------------------------------------------------------- trajectory PCA
def _synthetic_trajectory():
    g = torch.Generator().manual_seed(8)
    q, _ = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=DT))
    u, v = q[:, 0], q[:, 1]
    a = np.array([2.0, -2.0, 2.0, -2.0, 0.0])  # var 4
    b = np.array([1.0, 1.0, -1.0, -1.0, 0.0])  # var 1, cov(a, b) = 0; last point a = b = 0
    final = {"w": torch.randn(2, 3, generator=g, dtype=DT), "b": torch.randn(3, generator=g, dtype=DT)}
    states = [{"w": final["w"] + (ai * u + bi * v).reshape(2, 3), "b": final["b"] + ai} for ai, bi in zip(a, b)]
    return states, final, u, v, a, b


def test_trajectory_pca_recovers_the_plane():
    """PCs span {u, v}; projections = (a, b) up to sign; θ_T → (0, 0); variance ratios 0.8, 0.2."""
    states, final, u, v, a, b = _synthetic_trajectory()
    pca = trajectory_pca(states, final)  # the 1-D "b" is biasbn: zeroed
    pc = torch.stack([flatten(d, ["w"]) for d in pca.directions])
    span = torch.stack([u, v])
    torch.testing.assert_close(pc @ pc.T, torch.eye(2, dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close((pc @ span.T).abs(), torch.eye(2, dtype=DT), rtol=0, atol=1e-12)
    assert torch.equal(pca.directions[0].tensors["b"], torch.zeros(3, dtype=DT))
    np.testing.assert_allclose(np.abs(pca.coords), np.abs(np.stack([a, b], 1)), atol=1e-12)
    np.testing.assert_allclose(pca.coords[-1], [0.0, 0.0], atol=1e-14)
    np.testing.assert_allclose(pca.explained_variance_ratio, [0.8, 0.2], atol=1e-12)
    np.testing.assert_allclose(pca.explained_variance, [4.0, 1.0], rtol=1e-12)
    np.testing.assert_allclose(pca.distance, 0.0, atol=1e-12)
    # including the 1-D tensor moves it off the plane: a is added to "b" too
    assert pca.explained_variance[0] < trajectory_pca(states, final, ignore="none").explained_variance[0]


def test_trajectory_probe_true_loss_and_projection_loss():
    torch.manual_seed(9)
    model = nn.Linear(3, 2).to(DT)
    g = torch.Generator().manual_seed(10)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = {s: {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=DT) for k, v in base.items()} for s in (0, 10, 20)}
    states[30] = base
    x = torch.randn(16, 3, dtype=DT)
    data = [(x, torch.randn(16, 2, dtype=DT))]
    ctx = ProbeContext(model=model, data=data, loss="mse", step=30, steps=[0, 10, 20, 30], state_at=lambda s: states[s])
    r = Trajectory(grid=3).run(ctx)
    np.testing.assert_array_equal(r.coords["checkpoint"], [0, 10, 20, 30])
    for i, s in enumerate((0, 10, 20, 30)):
        want = PointEvaluator(model, states[s], [], data, "mse").evaluate(np.zeros((1, 0)))["loss"][0]
        assert r.values["loss"][i] == pytest.approx(want, rel=1e-13)
    assert r.values["loss_at_projection"][-1] == r.values["loss"][-1]
    # biases are ignored, so projected points keep θ_T's biases: the losses differ off the final point
    assert np.abs(r.values["loss_at_projection"][:3] - r.values["loss"][:3]).max() > 1e-3
    assert r.values["surface_loss"].shape == (3, 3) and r.dims["surface_loss"] == ("y", "x")
    assert r.values["distance_to_plane"][-1] == 0.0 and r.meta["rules_x"]["bias"] == "zero(biasbn)"


def test_surface_probe_checkpoint_and_pca_directions():
    """directions="checkpoints": α = 1 lands on the other checkpoint; "pca": the trajectory probe's pcs."""
    torch.manual_seed(11)
    model = nn.Linear(3, 2).to(DT)
    g = torch.Generator().manual_seed(12)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    states = {s: {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=DT) for k, v in base.items()} for s in (0, 10)}
    states[20] = base
    x = torch.randn(16, 3, dtype=DT)
    data = [(x, torch.randn(16, 2, dtype=DT))]
    ctx = ProbeContext(model=model, data=data, loss="mse", step=20, steps=[0, 10, 20], state_at=lambda s: states[s])
    r = Surface(dims=1, directions="checkpoints", x_step=0, xrange=(0, 1, 3)).run(ctx)
    ends = [PointEvaluator(model, states[s], [], data, "mse").evaluate(np.zeros((1, 0)))["loss"][0] for s in (20, 0)]
    assert r.values["loss"][0] == ends[0] and r.values["loss"][-1] == pytest.approx(ends[1], rel=1e-12)
    assert r.meta["rules_x"] == {"weight": "difference", "bias": "difference"} and r.dims["loss"] == ("x",)
    pca = Surface(directions="pca", xrange=(-1, 1, 3)).run(ctx)
    traj = Trajectory().run(ctx)
    np.testing.assert_array_equal(pca.values["direction_x"], traj.values["direction_x"])
    np.testing.assert_array_equal(pca.values["direction_y"], traj.values["direction_y"])
