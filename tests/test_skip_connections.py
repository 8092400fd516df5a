"""The surface roughness of experiments/skip_connections.py (Li, Xu, Taylor, Studer, Goldstein 2018, "Visualizing the
Loss Landscape of Neural Nets"); its convexity map is the surface probe's, tested in tests/probes/test_convexity.py."""

from __future__ import annotations

import numpy as np
import pytest
from test_experiments import load

skip = load("skip_connections")


def test_roughness_is_zero_on_a_log_linear_surface_and_the_laplacian_otherwise():
    a = np.linspace(-1, 1, 7)
    X, Y = np.meshgrid(a, a)
    assert skip.roughness(np.exp(2 * X - Y + 1)) == pytest.approx(0.0, abs=1e-12)
    h = a[1] - a[0]
    # log L = X² + Y²: the 5-point Laplacian is exactly 4h² at every interior point
    assert skip.roughness(np.exp(X**2 + Y**2)) == pytest.approx(4 * h**2, rel=1e-10)


def test_lr_schedule_is_linear_warmup_from_lr_over_100_then_cosine_to_zero():
    lr, steps, w = 0.05, 110, 10
    assert skip.lr_at(0, lr, steps) == skip.lr_at(77, lr, steps) == lr  # default: constant
    assert skip.lr_at(0, lr, steps, w) == pytest.approx(lr / 100, rel=1e-12)
    assert skip.lr_at(5, lr, steps, w) == pytest.approx(lr * (0.01 + 0.99 * 0.5), rel=1e-12)
    assert skip.lr_at(50, lr, steps, w) == lr  # warmup without decay: constant afterwards
    assert skip.lr_at(w, lr, steps, w, cosine=True) == pytest.approx(lr, rel=1e-12)
    assert skip.lr_at(w + 50, lr, steps, w, cosine=True) == pytest.approx(lr / 2, rel=1e-12)  # half-way: cos(π/2)=0
    assert skip.lr_at(w + 25, lr, steps, w, cosine=True) == pytest.approx(lr * (1 + np.sqrt(0.5)) / 2, rel=1e-12)
    assert skip.lr_at(steps, lr, steps, w, cosine=True) == pytest.approx(0.0, abs=1e-15)


def test_training_gate_names_every_net_below_the_threshold():
    assert skip.training_gate({"resnet-20": 1.0, "noshort-56": 0.9}) == (True, "")
    passed, reason = skip.training_gate({"resnet-20": 1.0, "noshort-56": 0.32, "noshort-20": float("nan")})
    assert not passed and reason.startswith("inconclusive")
    assert "noshort-56 train accuracy 0.320" in reason and "noshort-20" in reason and "resnet-20" not in reason
    assert skip.training_gate({"a": 0.5}, threshold=0.4) == (True, "")
