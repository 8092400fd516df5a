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
