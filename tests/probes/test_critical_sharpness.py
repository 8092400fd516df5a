"""critical_sharpness: λ_c = 2/η_c against closed forms on quadratics (Kalra et al. 2026).

On L(θ) = ½θᵀHθ + bᵀθ, L(θ − ηd) − L(θ) = −η gᵀd + ½η² dᵀHd, so η_c = 2gᵀd/dᵀHd exactly and
λ_c = dᵀHd/gᵀd (= gᵀHg/gᵀg for d = g). A linear model under half_sse has exactly that loss with H = XᵀX/N.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lossatlas.probes import ProbeContext
from lossatlas.probes.critical_sharpness import CriticalSharpness, adam_direction, critical_step, line_loss
from lossatlas.probes.sharpness import FunctionObjective


def _quadratic(P: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(P, P, generator=gen, dtype=torch.float64)
    H = A @ A.T / P + 0.1 * torch.eye(P, dtype=torch.float64)
    b = torch.randn(P, generator=gen, dtype=torch.float64)
    theta = torch.randn(P, generator=gen, dtype=torch.float64)
    return H, b, theta


def test_line_search_matches_the_quadratic_closed_form_for_any_direction():
    H, b, theta = _quadratic()
    obj = FunctionObjective(lambda p: 0.5 * p["w"] @ H @ p["w"] + b @ p["w"])
    g = H @ theta + b
    d = torch.randn(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    d = d if float(g @ d) > 0 else -d  # a descent direction
    for direction, eta0 in ((g, 1e-4), (g, 50.0), (d, 1.0)):
        s = critical_step(line_loss(obj, {"w": theta}, {"w": direction}), eta0=eta0, rtol=1e-12, max_evals=200)
        exact = float(direction @ H @ direction / (g @ direction))
        assert s.status == "converged"
        assert s.lambda_c == pytest.approx(exact, rel=1e-9)
        assert s.eta_c == pytest.approx(2 / exact, rel=1e-9)
    # the gradient step: the directional curvature gᵀHg/gᵀg, between λ_min and λ_max
    s = critical_step(line_loss(obj, {"w": theta}, {"w": g}), eta0=1.0, rtol=1e-12, max_evals=200)
    ev = torch.linalg.eigvalsh(H)
    assert s.lambda_c == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-9)
    assert float(ev[0]) < s.lambda_c < float(ev[-1])


def test_line_search_is_a_handful_of_forwards_and_reports_failures():
    H, b, theta = _quadratic()
    obj = FunctionObjective(lambda p: 0.5 * p["w"] @ H @ p["w"] + b @ p["w"])
    g = H @ theta + b
    s = critical_step(line_loss(obj, {"w": theta}, {"w": g}), eta0=1.0, rtol=1e-3)
    assert s.evals <= 15 and s.status == "converged"
    assert s.lambda_c == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-3)
    # an ascent direction: the loss rises at every step tried
    up = critical_step(line_loss(obj, {"w": theta}, {"w": -g}), eta0=1.0, max_evals=10)
    assert up.status == "rises_at_once" and math.isnan(up.lambda_c) and up.evals == 11
    # a direction of zero curvature on a linear loss: never rises
    lin = FunctionObjective(lambda p: b @ p["w"])
    flat = critical_step(line_loss(lin, {"w": theta}, {"w": b}), eta0=1.0, max_evals=8)
    assert flat.status == "never_rises" and math.isnan(flat.eta_c)


class _Linear(nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return (x @ self.w).unsqueeze(1)


def _linear_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(40, 1, generator=gen, dtype=torch.float64)
    w = torch.randn(5, generator=gen, dtype=torch.float64)
    H = X.T @ X / 40  # half_sse: L = (1/N) Σ ½ (xᵀw − y)²
    g = H @ w - X.T @ y[:, 0] / 40
    return _Linear(w), [(X[:20], y[:20]), (X[20:], y[20:])], H, g


def test_probe_gradient_direction_equals_directional_curvature_and_rayleigh_on_a_quadratic():
    model, batches, H, g = _linear_problem()
    ctx = ProbeContext(model=model, data=batches, loss="half_sse", step=3, lr=0.05)
    res = CriticalSharpness(rtol=1e-11, max_evals=120, dtype="float64", tol=1e-10).run(ctx)
    exact = float(g @ H @ g / (g @ g))
    assert res.meta["line_search_status"] == "converged"
    assert res.scalar("critical_sharpness") == pytest.approx(exact, rel=1e-8)
    assert res.scalar("rayleigh_quotient") == pytest.approx(exact, rel=1e-10)
    assert res.scalar("quadratic_estimate") == pytest.approx(exact, rel=1e-10)
    assert res.scalar("directional_derivative") == pytest.approx(float(g @ g), rel=1e-10)
    assert res.scalar("lambda_max") == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8)
    assert res.meta["two_over_lr"] == pytest.approx(40.0)
    assert res.values["search_eta"].shape == res.values["search_loss_change"].shape
    # the model is untouched
    assert torch.equal(model.w, _linear_problem()[0].w)


def test_update_direction_from_two_checkpoints_per_step_and_lr():
    model, batches, H, g = _linear_problem(1)
    w0 = model.w.detach().clone()
    delta = torch.randn(5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    delta = -delta if float(g @ delta) > 0 else delta  # θ_next − θ descends
    states = {10: {"w": w0}, 14: {"w": w0 + delta}}
    lr = 0.1
    ctx = ProbeContext(model=model, data=batches, loss="half_sse", step=10, lr=lr, steps=(10, 14),
                       state_at=lambda s: states[s])
    res = CriticalSharpness(direction="update", rtol=1e-11, max_evals=120, lambda_max=False).run(ctx)
    d = -delta / (4 * lr)  # θ_next = θ − 4·η·d: four steps at η
    assert res.meta["update_steps"] == [10, 14]
    assert res.scalar("critical_sharpness") == pytest.approx(float(d @ H @ d / (g @ d)), rel=1e-8)
    assert res.scalar("quadratic_estimate") == pytest.approx(float(d @ H @ d / (g @ d)), rel=1e-10)
    assert "lambda_max" not in res.values
    # at the last checkpoint the previous pair is used: the same direction here
    last = CriticalSharpness(direction="update", rtol=1e-11, max_evals=120, lambda_max=False, rayleigh=False).run(
        ProbeContext(model=model, data=batches, loss="half_sse", step=14, lr=lr, steps=(10, 14),
                     state_at=lambda s: states[s]))
    assert last.meta["update_steps"] == [10, 14] and "rayleigh_quotient" not in last.values


def test_adam_direction_is_the_bias_corrected_update():
    theta = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    state = {"w": {"exp_avg": torch.tensor([0.1, -0.3], dtype=torch.float64),
                   "exp_avg_sq": torch.tensor([0.04, 0.01], dtype=torch.float64), "step": torch.tensor(2.0)}}
    opt = {"name": "AdamW", "defaults": {"betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}}
    d = adam_direction(theta, state, opt)["w"]
    m_hat = np.array([0.1, -0.3]) / (1 - 0.9 ** 2)
    v_hat = np.array([0.04, 0.01]) / (1 - 0.99 ** 2)
    np.testing.assert_allclose(d.numpy(), m_hat / (np.sqrt(v_hat) + 1e-8) + 0.1 * np.array([1.0, -2.0]), rtol=1e-12)
    with pytest.raises(ValueError, match="exp_avg"):
        adam_direction(theta, {"w": {"exp_avg_sq": state["w"]["exp_avg_sq"]}}, opt)


def test_adam_direction_probe_and_relative_form_on_the_quadratic():
    model, batches, H, g = _linear_problem(2)
    state = {"w": {"exp_avg": g.clone() * 0.1, "exp_avg_sq": g.clone() ** 2 * 0.01 + 1e-4, "step": 5}}
    probe = CriticalSharpness(direction="adam", rtol=1e-11, max_evals=120, lambda_max=False)
    assert probe.needs_optimizer_state and not CriticalSharpness().needs_optimizer_state
    res = probe.run(ProbeContext(model=model, data=batches, loss="half_sse", step=5, lr=1e-2, optimizer_state=state,
                                 optimizer={"name": "Adam", "defaults": {}}))
    d = adam_direction({"w": model.w.detach()}, state, {"name": "Adam", "defaults": {}})["w"]
    assert res.scalar("critical_sharpness") == pytest.approx(float(d @ H @ d / (g @ d)), rel=1e-8)
    with pytest.raises(ValueError, match="optimizer state"):
        probe.run(ProbeContext(model=model, data=batches, loss="half_sse", step=5))


def test_relative_form_uses_the_other_data_sets_gradient():
    # the digits data: an MLP's loss on 40 examples along the gradient of another 40 examples' loss,
    # checked against the same line search on FunctionObjective-free brute force: L evaluated directly
    from lossatlas import models
    from lossatlas.batches import as_batches

    torch.manual_seed(0)
    model = models.build_model({"name": "mlp", "kwargs": {"widths": [64, 8, 10]}}).double()
    x, y = models.build_data({"name": "digits"})
    mine = as_batches((x[:40].double(), y[:40]))
    spec = {"name": "digits"}
    probe = CriticalSharpness(direction_data=spec, direction_examples=40, dtype="float64", rtol=1e-10,
                              max_evals=120, lambda_max=False, rayleigh=False)
    res = probe.run(ProbeContext(model=model, data=mine, loss="cross_entropy", step=0))
    # brute force: the gradient of the first 40 examples of `spec` (the same examples here), then the first
    # sign change of L(θ − ηd) − L(θ) on a fine grid around the reported η_c
    params = dict(model.named_parameters())
    loss = nn.functional.cross_entropy(torch.func.functional_call(model, params, (x[:40].double(),)), y[:40])
    grads = torch.autograd.grad(loss, list(params.values()))
    d = dict(zip(params, grads))

    def L(eta):
        with torch.no_grad():
            p = {k: v - eta * d[k] for k, v in params.items()}
            return float(nn.functional.cross_entropy(torch.func.functional_call(model, p, (x[:40].double(),)), y[:40]))

    eta_c = res.scalar("critical_step")
    assert res.meta["direction_examples"] == 40
    assert L(eta_c * (1 - 1e-6)) <= L(0.0) < L(eta_c * (1 + 1e-6))
    assert all(L(e) <= L(0.0) for e in np.linspace(0.02, 0.99, 12) * eta_c)  # the first crossing


def test_bad_settings_are_refused():
    for bad in ({"direction": "sideways"}, {"rtol": 0.0}, {"max_evals": 2}, {"eta0": -1.0},
                {"direction": "adam", "direction_data": {"name": "digits"}}):
        with pytest.raises(ValueError):
            CriticalSharpness(**bad)
    model, batches, _, _ = _linear_problem()
    with pytest.raises(ValueError, match="two checkpoints"):
        CriticalSharpness(direction="update").run(ProbeContext(model=model, data=batches, loss="half_sse", step=0))


def test_figures_draw_the_timeline_with_two_over_eta_and_the_line_search():
    from lossatlas.viz.figures import interactive_figures, paper_figure

    model, batches, _, _ = _linear_problem()
    results = [CriticalSharpness(lambda_max=False).run(
        ProbeContext(model=model, data=batches, loss="half_sse", step=s, lr=0.05)) for s in (0, 10)]
    fig = paper_figure("critical_sharpness", results)
    timeline, search = fig.axes[0], fig.axes[1]
    labels = [line.get_label() for line in timeline.get_lines()]
    assert {"λ_c = 2/η_c", "dᵀHd/dᵀd", "2/η"} <= set(labels)
    two_over_eta = timeline.get_lines()[labels.index("2/η")].get_ydata()
    np.testing.assert_allclose(two_over_eta, [40.0, 40.0])
    eta_c = results[-1].scalar("critical_step")
    assert any(np.allclose(line.get_xdata(), eta_c) for line in search.get_lines())
    figs = interactive_figures("critical_sharpness", results)
    assert len(figs) == 2 and {t.name for t in figs[0].data} >= {"λ_c = 2/η_c", "2/η"}
