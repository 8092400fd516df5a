"""``max_stable_lr`` follows the run's optimizer: closed forms, simulations of the real torch optimizers on a
2-D quadratic just below and above the reported step, and the hessian probe's metadata."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lossatlas.analysis import eos
from lossatlas.probes.base import ProbeContext
from lossatlas.probes.hessian import HessianProbe
from lossatlas.probes.stability import stability_meta, stability_rule

LAMS = (10.0, 1.0)  # the quadratic L = ½(10 x² + y²): sharpness 10


def _spec(name="SGD", **defaults):
    return {"name": name, "defaults": {"lr": 0.1, **defaults}}


@pytest.mark.parametrize("spec, factor, kind, words", [
    (None, 2.0, "gd", "no optimizer"),
    (_spec(momentum=0.0), 2.0, "gd", "gradient descent 2/λ"),
    (_spec(momentum=0.9), 3.8, "heavy_ball", "heavy-ball 2(1+β)/λ with β=0.9"),
    (_spec(momentum=0.5, dampening=0.5), 6.0, "heavy_ball", "d=0.5"),  # 2·1.5/0.5
    (_spec(momentum=0.9, nesterov=True), 3.8 / 2.8, "nesterov", "Nesterov"),
    (_spec("Adam", betas=[0.9, 0.999]), 38.0, "adam", "preconditioned"),
    (_spec("AdamW", betas=[0.8, 0.99]), 18.0, "adam", "β₁=0.8"),  # 2·1.8/0.2
])
def test_rules_match_closed_forms(spec, factor, kind, words):
    rule = stability_rule(spec)
    assert rule.kind == kind and words in rule.text
    assert rule.factor == pytest.approx(factor, rel=1e-12)
    assert rule.max_stable_lr(5.0) == pytest.approx(factor / 5.0, rel=1e-12)
    assert rule.threshold(0.01) == pytest.approx(factor / 0.01, rel=1e-12)
    if kind != "adam":  # the analysis module's thresholds agree (d = 0)
        beta = spec["defaults"].get("momentum", 0.0) if spec else 0.0
        if "dampening" not in (spec or {}).get("defaults", {}):
            assert eos.stability_threshold(0.01, optimizer=kind, beta=beta) == pytest.approx(rule.threshold(0.01))


def test_weight_decay_unknown_optimizers_and_adam_on_the_raw_hessian():
    rule = stability_rule(_spec(momentum=0.9, weight_decay=0.5))
    assert rule.max_stable_lr(9.5) == pytest.approx(3.8 / 10.0) and "weight_decay=0.5" in rule.text
    assert rule.max_stable_lr(-1.0) is None  # λ + w ≤ 0: no step limit
    assert stability_rule({"name": "RMSprop", "defaults": {}}) is None
    assert stability_meta({"name": "RMSprop"}, 3.0, 0.1) == {
        "stability_rule": "no stability rule for RMSprop; max_stable_lr not reported"}
    raw = stability_meta(_spec("Adam", betas=[0.9, 0.999]), 3.0, 0.1)
    assert "max_stable_lr" not in raw and "--preconditioned" in raw["stability_rule"]
    pre = stability_meta(_spec("Adam", betas=[0.9, 0.999]), 3.0, 0.1, preconditioned=True)
    assert pre["max_stable_lr"] == pytest.approx(38 / 3.0) and pre["stability_threshold"] == pytest.approx(380.0)


def _simulate(make, lr, steps=4000):
    """|θ| after ``steps`` of a torch optimizer on L = ½(10 x² + y²) from (1, 1) in float64."""
    theta = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    lam = torch.tensor(LAMS, dtype=torch.float64)
    opt = make([theta], lr)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (lam * theta**2).sum()).backward()
        opt.step()
        if not torch.isfinite(theta).all() or theta.abs().max() > 1e6:
            return float("inf")
    return float(theta.detach().abs().max())


@pytest.mark.parametrize("spec, make", [
    (_spec(momentum=0.0), lambda p, lr: torch.optim.SGD(p, lr=lr)),
    (_spec(momentum=0.9), lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)),
    (_spec(momentum=0.6, dampening=0.3), lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.6, dampening=0.3)),
    (_spec(momentum=0.9, nesterov=True), lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True)),
    (_spec(momentum=0.9, weight_decay=2.0),
     lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=2.0)),
])
def test_torch_optimizers_converge_just_below_and_diverge_just_above(spec, make):
    lr_max = stability_rule(spec).max_stable_lr(max(LAMS))
    assert _simulate(make, 0.97 * lr_max) < 1e-3
    assert _simulate(make, 1.03 * lr_max) == float("inf")
    # the plain 2/λ rule is wrong for momentum: heavy ball at 1.5× it still converges
    if spec["defaults"].get("momentum") == 0.9 and not spec["defaults"].get("nesterov") and not spec["defaults"].get(
            "weight_decay"):
        assert _simulate(make, 1.5 * 2.0 / max(LAMS)) < 1e-3


def test_frozen_adam_ema_momentum_threshold():
    """m ← β₁m + (1−β₁)g, θ ← θ − ηP⁻¹m with P fixed: stable iff λ(P⁻¹H) < 2(1+β₁)/((1−β₁)η)."""
    P = np.array([2.0, 0.5])
    lam_pre = max(np.array(LAMS) / P)  # the preconditioned sharpness of diag(LAMS)
    lr_max = stability_meta(_spec("Adam", betas=[0.9, 0.999]), lam_pre, None, preconditioned=True)["max_stable_lr"]

    def run(lr):
        th, m = np.ones(2), np.zeros(2)
        for _ in range(4000):
            m = 0.9 * m + 0.1 * np.array(LAMS) * th
            th = th - lr * m / P
            if np.abs(th).max() > 1e6:
                return np.inf
        return np.abs(th).max()

    assert run(0.97 * lr_max) < 1e-3 and run(1.03 * lr_max) == np.inf


def test_hessian_probe_reports_the_momentum_rule():
    """On a linear model with MSE the Hessian is exact; max_stable_lr = 2(1+β)/λ_max, and the rule is named."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False).double()
    x = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randn(40, 1, dtype=torch.float64)
    probe = HessianProbe(top_k=1, tol=1e-12)
    lam = float(np.linalg.eigvalsh(2.0 * (x.T @ x / len(x)).numpy())[-1])  # MSE = mean (f − y)²: H = 2XᵀX/n
    gd = probe.run(ProbeContext(model=model, data=[(x, y)], loss="mse"))
    assert gd.meta["lambda_max"] == pytest.approx(lam, rel=1e-8)
    assert gd.meta["max_stable_lr"] == pytest.approx(2.0 / lam) and "no optimizer" in gd.meta["stability_rule"]
    ctx = ProbeContext(model=model, data=[(x, y)], loss="mse", lr=0.05, optimizer=_spec(momentum=0.9))
    res = probe.run(ctx)
    assert res.meta["max_stable_lr"] == pytest.approx(3.8 / lam, rel=1e-10)
    assert res.meta["stability_rule"] == "heavy-ball 2(1+β)/λ with β=0.9"
    assert res.meta["stability_threshold"] == pytest.approx(3.8 / 0.05)
    # an Adam run: λ_max(H) gives no step limit, and the rule says to ask for the preconditioned sharpness
    adam = probe.run(ProbeContext(model=model, data=[(x, y)], loss="mse", lr=0.05, optimizer=_spec("Adam")))
    assert "max_stable_lr" not in adam.meta and "--preconditioned" in adam.meta["stability_rule"]


# -- interpolation barriers: the chord form is primary, the endpoint-mean form secondary -----------------------
def test_barriers_on_a_hand_computed_curve():
    """f(α) = 1 + 2α + 4α(1 − α) on α = 0, ¼, ½, ¾, 1: f = 1, 2.25, 3, 3.25, 3.

    Over the chord 1 + 2α the rise is 4α(1 − α): 1 at α = ½ (chord barrier); the endpoint-mean barrier is
    max f − (1 + 3)/2 = 3.25 − 2 = 1.25 (at α = ¾): it counts part of the endpoints' difference as barrier.
    """
    from lossatlas.probes.connectivity import barriers

    a = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 1.25])  # α = 1.25 lies outside [0, 1] and is ignored
    f = np.array([1.0, 2.25, 3.0, 3.25, 3.0, 100.0])
    b = barriers(a, f)
    assert b["chord"] == pytest.approx(1.0, abs=1e-15) and b["argmax_chord"] == 0.5
    assert b["endpoint_mean"] == pytest.approx(1.25, abs=1e-15)
    assert b["linear"] == b["chord"] and b["midpoint"] == b["endpoint_mean"]  # the former names
    # a convex curve: no barrier over the chord, while the endpoint-mean form is positive
    convex = barriers(a[:5], (1 + 2 * a[:5]) ** 2)
    assert convex["chord"] == 0.0 and convex["endpoint_mean"] == pytest.approx(9 - 5, abs=1e-15)


def test_interpolate_stores_the_chord_barrier_as_primary():
    from lossatlas.probes.connectivity import Interpolate

    torch.manual_seed(1)
    model = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(-1.0)
    x = torch.ones(1, 1, dtype=torch.float64)
    y = torch.zeros(1, 1, dtype=torch.float64)
    # MSE (w − 0)² from w = −1 to w = 3: f(α) = (4α − 1)², endpoints 1 and 9; chord 1 + 8α;
    # rise f − chord = 16α² − 16α = −16α(1 − α) ≤ 0 → chord barrier 0; endpoint-mean: 9 − 5 = 4
    ctx = ProbeContext(model=model, data=[(x, y)], loss="mse", step=1, steps=[1, 2],
                       state_at=lambda s: {"weight": torch.full((1, 1), 3.0, dtype=torch.float64)})
    r = Interpolate(to_step=2, alphas=(0.0, 1.0, 5)).run(ctx)
    np.testing.assert_allclose(r.values["loss"], (4 * np.linspace(0, 1, 5) - 1) ** 2, rtol=1e-12)
    assert r.scalar("loss_barrier") == pytest.approx(0.0, abs=1e-12)
    assert r.scalar("loss_endpoint_mean_barrier") == pytest.approx(4.0, rel=1e-12)
    assert "chord" in r.meta["barrier"] and "loss_midpoint_barrier" not in r.values
    assert {"error_barrier", "error_endpoint_mean_barrier"} <= set(r.values)


# -- surfaces: the quadratic check in words, and BatchNorm with kept statistics -------------------------------
def test_quadratic_verdict_in_words():
    from lossatlas.probes.surface import quadratic_regime

    a = np.linspace(-1, 1, 21)
    quad = quadratic_regime(a, 1 + 0.5 * a + 2 * a**2, 1.0, 0.5, 4.0)
    assert quad["verdict"].startswith("quadratic at this scale") and "1× dᵀHd" in quad["verdict"]
    quartic = 1 + 2 * a**2 + 10 * a**4  # leaves the quadratic 1 + 2α² by > 10 % where 10α⁴ > 0.1(1 + 2α² + 10α⁴)
    bad = quadratic_regime(a, quartic, 1.0, 0.0, 4.0)
    inside = a[np.abs(quartic - (1 + 2 * a**2)) <= 0.1 * quartic]
    assert bad["verdict"].startswith("not quadratic at this scale")
    assert f"only for α ∈ [{inside.min():.3g}, {inside.max():.3g}]" in bad["verdict"]


def test_bn_keep_surface_that_explodes_at_the_edges_warns():
    from lossatlas.probes.surface import warn_bn_keep

    bn_model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    x = y = np.linspace(-1, 1, 5)
    z = 1.0 + 20.0 * (x[None, :] ** 2 + y[:, None] ** 2)  # edges at 21–41× the centre
    with pytest.warns(UserWarning, match="--bn recompute"):
        assert "bn=keep" in warn_bn_keep(bn_model, "keep", z.ravel(), x, y)
    tame = 1.0 + 8.0 * (x[None, :] ** 2 + y[:, None] ** 2)  # corners at 17×: still above 10×
    with pytest.warns(UserWarning):
        warn_bn_keep(bn_model, "keep", tame.ravel(), x, y)
    calm = 1.0 + 4.0 * (x[None, :] ** 2 + y[:, None] ** 2)  # corners at 9×: no warning
    line = np.array([np.nan, 1.0, 1.0])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_bn_keep(bn_model, "keep", calm.ravel(), x, y) is None
        assert warn_bn_keep(bn_model, "recompute", z.ravel(), x, y) is None  # statistics recomputed
        assert warn_bn_keep(torch.nn.Linear(2, 2), "keep", z.ravel(), x, y) is None  # no BatchNorm
    with pytest.warns(UserWarning, match="non-finite"):
        warn_bn_keep(bn_model, "keep", line, np.array([-1.0, 0.0, 1.0]), None)
