"""Sharpness measures against closed forms and brute force in float64.

Quadratic f(w) = ½(w − w*)ᵀ diag(a) (w − w*) at w*: SAM l2 ½ρ²·max a_i, standard linf ½ρ²Σa_i,
adaptive linf ½ρ²Σa_i w*_i², average case (std ρ per coordinate) ½ρ²Σa_i, Keskar (A = I)
100·½ε²Σa_i(|w*_i| + 1)²; 2-layer bias-free ReLU nets under (αW₁, W₂/α) (Dinh et al. 2017); Euler's
θᵀ∇_θ f = (L+1) f behind the Fisher–Rao closed form (Liang et al. 2019).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from lossatlas.losses import per_example_loss
from lossatlas.probes.base import ProbeContext, get_probe
from lossatlas.probes.sharpness import (
    MEASURES,
    DataObjective,
    Sharpness,
    average_case_sharpness,
    fisher_rao_norm,
    gradient_norm,
    keskar_sharpness,
    m_sharpness,
    sam_sharpness,
    trainable_params,
    worst_case_sharpness,
)

import reference

DT = torch.float64


def _quadratic(A: torch.Tensor, center: torch.Tensor, offset: float = 0.0):
    """f(w) = ½ (w − w*)ᵀ A (w − w*) + offset on params {"w": w}."""
    return lambda p: 0.5 * (p["w"] - center) @ A @ (p["w"] - center) + offset


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return Q @ torch.diag(torch.linspace(0.2, 3.0, n, dtype=DT)) @ Q.T


def _mlp(widths=(4, 6, 5, 3), bias=True, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(DT)


def _data(n=30, d=4, c=3, seed=1, sizes=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, c, (n,), generator=g)
    if sizes is None:
        return [(x, y)]
    out, i = [], 0
    for s in sizes:
        out.append((x[i : i + s], y[i : i + s]))
        i += s
    return out


# ---------------------------------------------------------------------------------- SAM one step (Foret et al. 2021)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_sam_one_step_quadratic_closed_form(norm):
    A = _spd(8, 0)
    theta0 = torch.randn(8, generator=torch.Generator().manual_seed(3), dtype=DT)
    f = _quadratic(A, torch.zeros(8, dtype=DT))
    rho = 0.07
    g = A @ theta0
    eps = rho * g / g.norm() if norm == "l2" else rho * torch.sign(g)
    expected = g @ eps + 0.5 * eps @ A @ eps  # exact for a quadratic
    got = sam_sharpness(f, {"w": theta0}, rho, norm=norm)
    assert got == pytest.approx(float(expected), rel=1e-11)
    if norm == "l2":  # = ρ‖g‖ + ½ρ² gᵀAg/‖g‖²
        assert got == pytest.approx(float(rho * g.norm() + 0.5 * rho**2 * (g @ A @ g) / (g @ g)), rel=1e-11)


def test_adaptive_sam_one_step_is_asam_perturbation():
    A = _spd(6, 1)
    theta0 = torch.randn(6, generator=torch.Generator().manual_seed(4), dtype=DT)
    f = _quadratic(A, torch.zeros(6, dtype=DT))
    rho, eta = 0.5, 0.01
    g = A @ theta0
    T = theta0.abs() + eta
    eps = rho * T**2 * g / (T * g).norm()  # ASAM, Kwon et al. 2021
    expected = g @ eps + 0.5 * eps @ A @ eps
    assert sam_sharpness(f, {"w": theta0}, rho, adaptive=True, eta=eta) == pytest.approx(float(expected), rel=1e-11)


def test_sam_at_stationary_point_is_zero():
    f = _quadratic(_spd(4, 2), torch.zeros(4, dtype=DT))
    assert sam_sharpness(f, {"w": torch.zeros(4, dtype=DT)}, 0.1) == 0.0


# -------------------------------------------------------------------------------- worst case: quadratic closed forms


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["standard", "adaptive"])
def test_worst_case_quadratic_closed_forms(norm, adaptive):
    # f = ½(w − w*)ᵀ diag(a) (w − w*) at w*; a separated top eigenvalue so 20 APGD iterations converge.
    n = 12
    gen = torch.Generator().manual_seed(5)
    a = torch.cat([torch.tensor([4.0], dtype=DT), torch.rand(n - 1, generator=gen, dtype=DT) * 2])
    wstar = torch.randn(n, generator=gen, dtype=DT) + 0.5
    f = _quadratic(torch.diag(a), wstar)
    rho = 0.1
    c2 = wstar**2 if adaptive else torch.ones(n, dtype=DT)
    expected = 0.5 * rho**2 * float((a * c2).max() if norm == "l2" else (a * c2).sum())
    got = worst_case_sharpness(
        f, {"w": wstar.clone()}, rho, steps=20, adaptive=adaptive, eta=0.0, norm=norm,
        rand_init=True, generator=torch.Generator().manual_seed(0),
    )
    assert 0.99 * expected <= got <= expected * (1 + 1e-9)


def test_worst_case_rotated_quadratic_reaches_lambda_max():
    A = _spd(10, 6) + 3.0 * torch.outer(torch.ones(10, dtype=DT), torch.ones(10, dtype=DT)) / 10
    lam = float(torch.linalg.eigvalsh(A).max())
    got = worst_case_sharpness(_quadratic(A, torch.zeros(10, dtype=DT)), {"w": torch.zeros(10, dtype=DT)}, 0.2,
                               rand_init=True, generator=torch.Generator().manual_seed(1))
    assert 0.99 * 0.5 * 0.04 * lam <= got <= 0.5 * 0.04 * lam * (1 + 1e-9)


def test_worst_case_at_least_one_step_and_feasible():
    A = _spd(8, 7)
    theta0 = torch.randn(8, generator=torch.Generator().manual_seed(8), dtype=DT)
    f = _quadratic(A, torch.zeros(8, dtype=DT))
    rho = 0.3
    one = sam_sharpness(f, {"w": theta0}, rho)
    many = worst_case_sharpness(f, {"w": theta0}, rho, steps=20)
    # upper bound on the ρ-ball: ρ‖g‖ + ½ρ²λ_max
    bound = rho * float((A @ theta0).norm()) + 0.5 * rho**2 * float(torch.linalg.eigvalsh(A).max())
    assert one - 1e-12 <= many <= bound + 1e-12
    assert many > one * (1 + 1e-4)  # the ascent improves on the first-order step for this curvature


# ------------------------------------------------------------------------------ average case: quadratic closed forms


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["standard", "adaptive"])
def test_average_case_quadratic_within_three_stderr(norm, adaptive):
    n = 10
    A = _spd(n, 9)
    wstar = 2.0 * torch.randn(n, generator=torch.Generator().manual_seed(10), dtype=DT)  # c² far from 1
    rho = 0.3
    c2 = wstar**2 if adaptive else torch.ones(n, dtype=DT)
    var = 1.0 if norm == "l2" else 1.0 / 3.0  # E z² for N(0,1) and U[−1,1]
    expected = 0.5 * rho**2 * var * float((torch.diagonal(A) * c2).sum())
    mean, se = average_case_sharpness(_quadratic(A, wstar), {"w": wstar.clone()}, rho, num_samples=400,
                                      adaptive=adaptive, eta=0.0, norm=norm,
                                      generator=torch.Generator().manual_seed(11))
    assert 0 < se < 0.2 * expected
    assert abs(mean - expected) <= 3 * se


# --------------------------------------------------------------------------------------- Keskar (Keskar et al. 2017)


def test_keskar_full_space_closed_form():
    n = 7
    gen = torch.Generator().manual_seed(12)
    a = torch.rand(n, generator=gen, dtype=DT) + 0.1
    wstar = torch.randn(n, generator=gen, dtype=DT)
    eps, offset = 1e-3, 0.3
    f = _quadratic(torch.diag(a), wstar, offset)
    expected = 100 * 0.5 * eps**2 * float((a * (wstar.abs() + 1) ** 2).sum()) / (1 + offset)
    got = keskar_sharpness(f, {"w": wstar.clone()}, eps, generator=torch.Generator().manual_seed(0))
    assert got == pytest.approx(expected, rel=1e-8)


def test_keskar_random_subspace_closed_form():
    n = 7
    gen = torch.Generator().manual_seed(13)
    a = torch.rand(n, generator=gen, dtype=DT) + 0.1
    wstar = torch.randn(n, generator=gen, dtype=DT)
    A = torch.randn(n, 1, generator=gen, dtype=DT)  # p = 1: the box is an interval, the max at either end
    eps = 5e-4
    col = A[:, 0]
    bound = eps * (abs(float(col @ wstar / (col @ col))) + 1)
    expected = 100 * 0.5 * bound**2 * float(col @ (a * col))
    got = keskar_sharpness(_quadratic(torch.diag(a), wstar), {"w": wstar.clone()}, eps, subspace=A,
                           generator=torch.Generator().manual_seed(0))
    assert got == pytest.approx(expected, rel=1e-8)
    with pytest.raises(ValueError, match="subspace matrix must have shape"):
        keskar_sharpness(_quadratic(torch.diag(a), wstar), {"w": wstar}, eps, subspace=torch.ones(3, 1, dtype=DT))


# ------------------------------------------------------------------------------ reparametrisation (Dinh et al. 2017)


def _rescaled(params, alpha):
    """(W₁, W₂) ↦ (αW₁, W₂/α) for a 2-layer bias-free ReLU net."""
    return {"0.weight": alpha * params["0.weight"], "2.weight": params["2.weight"] / alpha}


def test_adaptive_sharpness_invariant_under_dinh_rescaling():
    model = _mlp((4, 8, 3), bias=False, seed=2)
    batches = _data(n=24, sizes=(24,))
    params = trainable_params(model)
    scaled = _rescaled(params, 10.0)
    obj = DataObjective(model, batches, "cross_entropy")
    x = batches[0][0]
    assert torch.allclose(obj.forward(params, x), obj.forward(scaled, x), rtol=1e-12, atol=1e-12)

    def both(fn):
        return fn(params), fn(scaled)

    kw = dict(adaptive=True, eta=0.0)
    for fn in (
        lambda p: sam_sharpness(obj, p, 0.5, **kw),
        lambda p: worst_case_sharpness(obj, p, 0.5, steps=10, **kw),
        lambda p: average_case_sharpness(obj, p, 0.5, num_samples=5, generator=torch.Generator().manual_seed(3),
                                         **kw)[0],
        lambda p: worst_case_sharpness(obj, p, 0.01, steps=5, norm="linf", **kw),
    ):
        s, s_scaled = both(fn)
        assert s > 1e-6
        assert s_scaled == pytest.approx(s, rel=1e-6)
    s, s_scaled = both(lambda p: sam_sharpness(obj, p, 0.05))
    assert abs(s_scaled - s) > 0.05 * abs(s)  # standard SAM sharpness is not invariant
    s, s_scaled = both(lambda p: gradient_norm(obj, p))
    assert abs(s_scaled - s) > 0.05 * abs(s)


def test_asam_invariant_under_per_coordinate_rescaling_of_a_linear_model():
    torch.manual_seed(4)
    d, c = 5, 3
    x = torch.randn(20, d, dtype=DT)
    y = torch.randint(0, c, (20,))
    D = torch.tensor([0.1, 3.0, 1.0, 7.0, 0.5], dtype=DT)
    model = nn.Linear(d, c, bias=False).to(DT)
    params = trainable_params(model)
    scaled = {"weight": params["weight"] / D}  # W D⁻¹ on inputs X D: the same function of the data
    obj = DataObjective(model, [(x, y)], "mse")
    obj_scaled = DataObjective(model, [(x * D, y)], "mse")
    assert torch.allclose(obj.value(params), obj_scaled.value(scaled), rtol=1e-13)
    a = sam_sharpness(obj, params, 0.5, adaptive=True, eta=0.0)
    b = sam_sharpness(obj_scaled, scaled, 0.5, adaptive=True, eta=0.0)
    assert a > 0 and b == pytest.approx(a, rel=1e-10)
    a = sam_sharpness(obj, params, 0.05)
    b = sam_sharpness(obj_scaled, scaled, 0.05)
    assert abs(a - b) > 0.05 * abs(a)


# ------------------------------------------------------------------------------------ Fisher–Rao (Liang et al. 2019)


@pytest.mark.parametrize("loss", ["cross_entropy", "half_sse"])
def test_fisher_rao_closed_form_bias_free_relu(loss):
    num_hidden = 2
    model = _mlp((4, 6, 5, 3), bias=False, seed=5)
    params = trainable_params(model)
    batches = _data(n=25, sizes=(7, 13, 5))
    theta = torch.cat([v.reshape(-1) for v in params.values()])
    closed, brute, count = 0.0, 0.0, 0
    for x, y in batches:
        out = torch.func.functional_call(model, params, (x,))
        # Euler: ⟨θ, ∇θ f⟩ = (L+1) f
        _, jv = torch.func.jvp(lambda p, x=x: torch.func.functional_call(model, p, (x,)), (params,), (params,))
        assert torch.allclose(jv, (num_hidden + 1) * out, rtol=1e-12, atol=1e-12)
        leaf = out.detach().requires_grad_(True)
        dl = torch.autograd.grad(per_example_loss(loss, leaf, y).sum(), leaf)[0]
        closed += float(((num_hidden + 1) ** 2 * (dl * out).sum(1) ** 2).sum())
        # n_b θᵀ F_emp θ = Σ_i (g_iᵀθ)² with F_emp = (1/n_b) Σ g_i g_iᵀ over the batch
        brute += x.shape[0] * float(theta @ reference.empirical_fisher(model, [(x, y)], loss) @ theta)
        count += x.shape[0]
    got = fisher_rao_norm(model, params, batches, loss)
    assert got == pytest.approx(math.sqrt(closed / count), rel=1e-10)
    assert got == pytest.approx(math.sqrt(brute / count), rel=1e-10)


def test_fisher_rao_model_target_matches_true_fisher_with_biases():
    model = _mlp((4, 6, 3), bias=True, seed=6)
    params = trainable_params(model)
    x, y = _data(n=9, sizes=(9,))[0]
    theta = torch.cat([v.reshape(-1) for v in params.values()])
    # N θᵀFθ with F = E_x Σ_c p_c ∇log p_c ∇log p_cᵀ (true Fisher of the softmax model)
    total = x.shape[0] * float(theta @ reference.fisher(model, [(x, y)], "cross_entropy") @ theta)
    got = fisher_rao_norm(model, params, [(x, y)], "cross_entropy", target="model")
    assert got == pytest.approx(math.sqrt(total / x.shape[0]), rel=1e-10)
    with pytest.raises(ValueError, match="unknown target 'true'; choose one of "):
        fisher_rao_norm(model, params, [(x, y)], "cross_entropy", target="true")


# ---------------------------------------------------------------------------------------------- data paths


def test_gradient_norm_equals_autograd_over_unequal_batches():
    model = _mlp(seed=7)
    batches = _data(n=25, sizes=(7, 13, 5))
    expected = float(reference.gradient(model, batches, "cross_entropy").norm())  # ‖∇ Σ_b n_b L_b / N‖
    got = gradient_norm(DataObjective(model, batches, "cross_entropy"), trainable_params(model))
    assert got == pytest.approx(expected, rel=1e-12)


def test_m_sharpness_chunks():
    model = _mlp(seed=8)
    params = trainable_params(model)
    batches = _data(n=25, sizes=(7, 13, 5))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    full = sam_sharpness(DataObjective(model, [(x, y)], "cross_entropy"), params, 0.05)
    assert m_sharpness(model, params, batches, "cross_entropy", 0.05, m=25) == pytest.approx(full, rel=1e-12)
    assert m_sharpness(model, params, batches, "cross_entropy", 0.05, m=None) == pytest.approx(full, rel=1e-12)
    # m = 10: chunks of 10, 10, 5 examples, example-weighted
    parts = [sam_sharpness(DataObjective(model, [(x[i : i + 10], y[i : i + 10])], "cross_entropy"), params, 0.05)
             for i in (0, 10, 20)]
    expected = (10 * parts[0] + 10 * parts[1] + 5 * parts[2]) / 25
    got = m_sharpness(model, params, batches, "cross_entropy", 0.05, m=10, batch_size=4)
    assert got == pytest.approx(expected, rel=1e-12)
    assert abs(got - full) > 1e-3 * abs(full)


# ---------------------------------------------------------------------------------------------- the probe


def _bn_model():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3)).to(DT)
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.train()
    model[3].eval()  # a mixed state that must survive
    return model


def _fast(**kw):
    return Sharpness(**{"steps": 3, "num_samples": 3, "m": 8, "keskar_iters": 3, "max_examples": 20, **kw})


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_probe_leaves_model_untouched(mode):
    model = _bn_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    ctx = ProbeContext(model=model, data=_data(n=24, d=4, sizes=(10, 14)), loss="cross_entropy", step=3)
    result = _fast(mode=mode, fisher="model").run(ctx)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == flags
    for name in MEASURES:
        assert result.values[name].shape == ()
        assert math.isfinite(result.scalar(name))
    assert set(result.values) == {"loss", *MEASURES, "average_case_stderr", "adaptive_average_case_stderr"}
    assert result.meta["mode"] == mode and result.meta["loss_name"] == "cross_entropy"
    assert result.meta["num_examples"] == 20 and result.meta["num_chunks"] == 3
    json.dumps(result.meta)
    json.dumps(result.config)


def test_probe_eval_mode_by_default_and_matches_functions():
    model = _bn_model()
    data = _data(n=24, d=4, sizes=(24,))
    result = _fast(measures=("sam", "grad_norm", "average_case"), max_examples=None, seed=5).run(
        ProbeContext(model=model, data=data, loss="cross_entropy"))
    assert result.scalar("loss") == pytest.approx(reference.loss_value(model, data, "cross_entropy"), rel=1e-12)
    obj = DataObjective(model, data, "cross_entropy")  # eval mode
    params = trainable_params(model)
    assert result.scalar("sam") == pytest.approx(sam_sharpness(obj, params, 0.05), rel=1e-12)
    assert result.scalar("grad_norm") == pytest.approx(gradient_norm(obj, params), rel=1e-12)
    again = _fast(measures=("average_case",), max_examples=None, seed=5).run(
        ProbeContext(model=model, data=data, loss="cross_entropy"))
    assert again.scalar("average_case") == result.scalar("average_case")  # seed per measure, not per position
    other = _fast(measures=("average_case",), max_examples=None, seed=6).run(
        ProbeContext(model=model, data=data, loss="cross_entropy"))
    assert other.scalar("average_case") != result.scalar("average_case")


def test_probe_registered_and_validates():
    assert get_probe("sharpness") is Sharpness
    assert Sharpness(measures=["sam"]).measures == ("sam",)
    with pytest.raises(ValueError, match="unknown sharpness measure 'sharpest'"):
        Sharpness(measures=("sam", "sharpest"))
    with pytest.raises(ValueError, match="unknown norm 'l1'; choose one of "):
        Sharpness(norm="l1")
    with pytest.raises(ValueError, match="rho must be a positive"):
        Sharpness(rho=0.0)
    with pytest.raises(ValueError, match="m must be a positive integer"):
        Sharpness(m=0)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2"):
        Sharpness(num_samples=1)
    with pytest.raises(ValueError, match="unknown loss"):
        Sharpness(measures=("sam",)).run(ProbeContext(model=_mlp(), data=_data(), loss="hinge"))


def test_lambda_max_and_trace_from_curvature_engine_match_dense_hessian():
    """λ_max and tr(H) in the sharpness probe equal the dense float64 Hessian's."""
    model = _mlp(bias=True).double()
    batches = _data()
    res = Sharpness(measures=("grad_norm",), lambda_max=True, trace=True).run(
        ProbeContext(model=model, data=batches, loss="cross_entropy"))
    H = reference.hessian(model, batches, "cross_entropy")
    evals = reference.eigenvalues(H)
    assert res.scalar("lambda_max") == pytest.approx(float(evals[-1]), rel=1e-4)
    assert abs(res.scalar("trace") - reference.trace(H)) <= 4 * res.scalar("trace_stderr") + 1e-10
