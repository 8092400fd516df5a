"""Curved mode connectivity: a trained Bézier / polygonal chain between two minima of a deep linear network."""

import numpy as np
import pytest
import torch
from torch import nn

from lossatlas.probes import ProbeContext
from lossatlas.probes.curve import Curve, curve_directions, curve_weights, fit_curve

X = torch.linspace(-1.0, 1.0, 16, dtype=torch.float64).reshape(-1, 1)
DATA = [(X[:8], X[:8]), (X[8:], X[8:])]  # targets y = x: a minimum wherever w2·W1 = 1
M2 = float((X**2).mean())  # mse at the output p·x: (p − 1)² · mean(x²)


def deep_linear(w1, w2) -> nn.Module:
    """f(x) = w2ᵀ w1 x with hidden width 2 (no biases), float64."""
    m = nn.Sequential(nn.Linear(1, 2, bias=False), nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor(w1, dtype=torch.float64).reshape(2, 1))
        m[1].weight.copy_(torch.tensor(w2, dtype=torch.float64).reshape(1, 2))
    return m


def run(start, end, **settings):
    model = deep_linear(*start)
    other = deep_linear(*end).state_dict()
    ctx = ProbeContext(model=model, data=DATA, loss="mse", step=0, state_at=lambda s: other)
    return Curve(to_step=1, **settings).run(ctx)


def test_bezier_barrier_vanishes_where_the_line_has_one():
    # the two minima (w1, w2) = (e1, e1) and (e2, e2) (hidden units swapped): on the line w1 = w2 = (1 − t, t),
    # p(t) = (1 − t)² + t², so L(t) = (p − 1)² m₂ = 4t²(1 − t)² m₂ and the barrier is L(½) = m₂/4 (chord 0)
    res = run(([1.0, 0.0], [1.0, 0.0]), ([0.0, 1.0], [0.0, 1.0]), curve_steps=300, curve_lr=0.05)
    t = res.coords["t"]
    np.testing.assert_allclose(res.values["line_loss"], 4 * t**2 * (1 - t) ** 2 * M2, rtol=1e-12, atol=1e-15)
    assert res.scalar("line_loss_barrier") == pytest.approx(M2 / 4, rel=1e-12)
    assert res.values["loss"][0] == pytest.approx(0.0, abs=1e-20) and res.values["loss"][-1] == pytest.approx(0.0, abs=1e-20)
    # the trained curve (the bend learns the rotation through the other hidden unit): barrier < 5% of the line's
    assert res.scalar("loss_barrier") < 0.05 * res.scalar("line_loss_barrier")
    assert res.scalar("bend_offset") > 0.1
    assert res.values["train_loss"][-20:].mean() < 0.05 * res.values["train_loss"][:5].mean()
    assert res.meta["curve"] == "bezier" and res.meta["bn"] == "keep"  # no BatchNorm: nothing to recompute


def test_polychain_lowers_the_barrier_too():
    res = run(([1.0, 0.0], [1.0, 0.0]), ([0.0, 1.0], [0.0, 1.0]), curve="polychain", curve_steps=300, curve_lr=0.05)
    assert res.scalar("loss_barrier") < 0.2 * res.scalar("line_loss_barrier")


def test_untrained_curve_is_the_line_and_antipodal_minima_have_the_closed_form_barrier():
    # (w1, w2) and (−w1, −w2): at t = ½ every weight is 0, so the line's barrier is L(0) = m₂
    res = run(([1.0, 0.0], [1.0, 0.0]), ([-1.0, 0.0], [-1.0, 0.0]), curve_steps=0)
    t = res.coords["t"]
    np.testing.assert_allclose(res.values["line_loss"], ((1 - 2 * t) ** 2 - 1) ** 2 * M2, rtol=1e-12, atol=1e-15)
    assert res.scalar("line_loss_barrier") == pytest.approx(M2, rel=1e-12)
    # with the bend at the midpoint, (1 − t)²θ₀ + t(1 − t)(θ₀ + θ₁) + t²θ₁ = θ₀ + t(θ₁ − θ₀): the curve is the line
    np.testing.assert_allclose(res.values["loss"], res.values["line_loss"], rtol=1e-12, atol=1e-15)
    assert res.scalar("bend_offset") == 0.0


def test_curve_weights():
    t = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    b = curve_weights("bezier", t)
    np.testing.assert_allclose(b, np.stack([(1 - t) ** 2, 2 * t * (1 - t), t**2], 1))
    c = curve_weights("polychain", t)
    np.testing.assert_allclose(c, [[1, 0, 0], [0.5, 0.5, 0], [0, 1, 0], [0, 0.5, 0.5], [0, 0, 1]])
    np.testing.assert_allclose(b.sum(1), 1.0)
    with pytest.raises(ValueError):
        curve_weights("spline", t)


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def test_batchnorm_statistics_are_recomputed_along_the_curve():
    torch.manual_seed(0)
    model, other = BNNet().double(), BNNet().double()
    xs, ys = torch.randn(24, 3, dtype=torch.float64), torch.randint(0, 2, (24,))
    data = [(xs[:12], ys[:12]), (xs[12:], ys[12:])]
    with torch.no_grad():  # different running statistics at both ends
        model.bn.running_mean.fill_(0.3)
        other.bn.running_var.fill_(2.0)
    end = other.state_dict()
    ctx = ProbeContext(model=model, data=data, loss="cross_entropy", step=0, state_at=lambda s: end)
    res = Curve(to_step=1, num_points=5, curve_steps=6, seed=3).run(ctx)
    assert res.meta["bn"] == "recompute"
    # reference: set φ(t) by hand, reset the BN statistics, average them over the batches in train mode, evaluate
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = {k for k, _ in model.named_parameters()}
    s0 = {k: v for k, v in start.items() if k in params}
    bend, _ = fit_curve(model, {**s0, **{k: v for k, v in start.items() if k not in params}}, end, data,
                        "cross_entropy", steps=6, seed=3)
    for i, t in enumerate(res.coords["t"]):
        w0, wb, w1 = curve_weights("bezier", t)
        ref = BNNet().double()
        with torch.no_grad():
            for k, p in ref.named_parameters():
                p.copy_(w0 * start[k] + wb * bend[k] + w1 * end[k])
        ref.bn.reset_running_stats()
        ref.bn.momentum = None
        ref.train()
        with torch.no_grad():
            for x, _ in data:
                ref(x)
        ref.eval()
        with torch.no_grad():
            loss = sum(len(y) * float(nn.functional.cross_entropy(ref(x), y)) for x, y in data) / 24
        assert res.values["loss"][i] == pytest.approx(loss, rel=1e-10), t
    # the directions: buffers move on the line (their bend sits at the midpoint)
    d_b, d_1 = curve_directions(start, end, bend)
    torch.testing.assert_close(d_b["bn.running_var"], 0.5 * d_1["bn.running_var"])


def test_bad_settings():
    for bad in ({"num_points": 1}, {"curve_lr": 0.0}, {"optimizer": "lbfgs"}, {"curve_steps": -1}, {"bn": "x"}):
        with pytest.raises(ValueError):
            Curve(to_step=1, **bad)
    with pytest.raises(ValueError):
        Curve()


def test_figures_draw():
    from lossatlas.viz.figures import interactive_figures, paper_figure

    res = run(([1.0, 0.0], [1.0, 0.0]), ([0.0, 1.0], [0.0, 1.0]), curve_steps=5, num_points=7)
    assert len(paper_figure("curve", [res]).axes) == 2
    assert all(f is not None for f in interactive_figures("curve", [res]))
