"""Closed-form neural-collapse geometry of deep linear networks (balanced and imbalanced classes).

Dang, Tran, Osher, Tran-The, Ho, Nguyen 2023 (ICML), "Neural Collapse in Deep Linear Networks: From
Balanced to Imbalanced Data". Unconstrained-features model with M bias-free linear layers and MSE:

    f(W_M, …, W_1, H) = 1/(2N) Σ_i ||W_M⋯W_1 h_i − y_i||² + (λ_W/2) Σ_m ||W_m||_F² + (λ_H/2) ||H||_F²,

y_i one-hot, class k holding n_k examples, N = Σ_k n_k, every width ≥ C. At a global minimizer
(derivation in ``minimizer_geometry``): features collapse to class means h̄_k (NC1); the means of
different classes are orthogonal at the input of every layer, and the layers are balanced with one
singular value s_k per class — the *general orthogonal frame* (GOF). With x_k the root of

    b/n_k = M x^{M−1} / (x^M + 1)²,   b = M N (N λ_W^M λ_H)^{1/M},

s_k = (N λ_H x_k^M)^{1/(2M)}, σ_k = s_k^M (singular value of the product W = W_M⋯W_1) and
a_k = ||h̄_k|| = σ_k / (σ_k² + N λ_H):

    W Wᵀ = diag(s_k^{2M}),  H̄ᵀH̄ = diag(s_k^{2M} / (s_k^{2M} + Nλ_H)²),  W H̄ = diag(s_k^{2M} / (s_k^{2M} + Nλ_H)),

and at the input of layer m (m = 1..M, features h^{(m)} = W_{m−1}⋯W_1 h): ||h̄_k^{(m)}|| = s_k^{m−1} a_k, the
downstream product W_M⋯W_m has singular value s_k^{M−m+1} on class k and W_M⋯W_m h̄^{(m)}_k = σ_k a_k e_k.
Balanced classes (all n_k equal) give the orthogonal frame (OF). A class whose per-class objective is lowest
at s = 0 collapses to w_k = 0, h̄_k = 0 (x_k := 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def _check(counts, num_layers: int, lambda_w: float, lambda_h: float) -> np.ndarray:
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or n.size < 2 or np.any(n <= 0):
        raise ValueError(f"counts must be ≥ 2 positive class sizes, got {counts!r}")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    for key, v in (("lambda_w", lambda_w), ("lambda_h", lambda_h)):
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{key} must be finite and > 0, got {v!r}")
    return n


def class_objective(s: np.ndarray | float, n_k: float, total: float, num_layers: int, lambda_w: float,
                    lambda_h: float) -> np.ndarray:
    """Per-class objective after minimising out h̄_k and balancing the layers.

    g_k(s) = n_k λ_H / (2 (s^{2M} + N λ_H)) + (M λ_W / 2) s², with s the per-layer singular value on class k.
    """
    s = np.asarray(s, dtype=np.float64)
    m = num_layers
    return n_k * lambda_h / (2.0 * (s ** (2 * m) + total * lambda_h)) + 0.5 * m * lambda_w * s**2


def gof_roots(counts, num_layers: int, lambda_w: float, lambda_h: float) -> np.ndarray:
    """x_k of the theorem: the positive root of b/n_k = M x^{M−1}/(x^M+1)² minimising g_k, else 0.

    The equation is the polynomial c x^{2M} + 2c x^M − x^{M−1} + c = 0 with c = b/(M n_k); every positive
    root is a stationary point of g_k (s^{2M} = N λ_H x^M); the global minimiser is the one (or s = 0)
    with the lowest g_k, which is the paper's largest root whenever that root beats s = 0.
    """
    n = _check(counts, num_layers, lambda_w, lambda_h)
    m, total = num_layers, float(n.sum())
    b = m * total * (total * lambda_w**m * lambda_h) ** (1.0 / m)
    out = np.zeros_like(n)
    for k, n_k in enumerate(n):
        c = b / (m * n_k)
        poly = np.zeros(2 * m + 1)  # coefficients from x^{2M} down to x^0
        poly[0] += c
        poly[m] += 2 * c
        poly[2 * m - (m - 1)] -= 1.0
        poly[2 * m] += c
        roots = np.roots(poly)
        real = roots[np.abs(roots.imag) <= 1e-9 * np.maximum(1.0, np.abs(roots))].real
        cands = [0.0] + [float(x) for x in real if x > 0]
        s = [(total * lambda_h * x**m) ** (1.0 / (2 * m)) for x in cands]
        g = [float(class_objective(v, n_k, total, m, lambda_w, lambda_h)) for v in s]
        out[k] = cands[int(np.argmin(g))]
    return out


def minimizer_geometry(counts, num_layers: int, lambda_w: float, lambda_h: float) -> dict[str, np.ndarray | float]:
    """The global minimizer's per-class, per-layer geometry (see the module docstring).

    Derivation: for fixed W, each h_i minimises (1/(2N))||W h − y||² + (λ_H/2)||h||², so
    h = (WᵀW + Nλ_H I)^{−1}Wᵀ y (NC1). With W h̄_k ∝ e_k and orthogonal class directions the loss decouples;
    min Σ_m ||W_m||² with product singular value σ is M σ^{2/M} (balanced layers, σ = s^M), and the fit term
    at the optimal h is λ_H/(2(σ² + Nλ_H)) per example, giving g_k(s) (``class_objective``).

    Returns ``x`` (C,), ``s`` per-layer singular values (C,), ``sigma`` = s^M, ``feature_norm`` a_k,
    ``output`` σ_k a_k (diagonal of W H̄), ``mean_norm`` (M, C) with row m−1 the class-mean norms at the input
    of layer m, ``product_singular`` (M, C) with row m−1 the singular values of W_M⋯W_m, and ``loss`` f*.
    """
    n = _check(counts, num_layers, lambda_w, lambda_h)
    m, total = num_layers, float(n.sum())
    x = gof_roots(n, m, lambda_w, lambda_h)
    s = (total * lambda_h * x**m) ** (1.0 / (2 * m))
    sigma = s**m
    a = sigma / (sigma**2 + total * lambda_h)
    layers = np.arange(1, m + 1)[:, None]
    loss = float(sum(class_objective(s_k, n_k, total, m, lambda_w, lambda_h) for s_k, n_k in zip(s, n)))
    return {"x": x, "s": s, "sigma": sigma, "feature_norm": a, "output": sigma * a,
            "mean_norm": s[None, :] ** (layers - 1) * a[None, :],
            "product_singular": s[None, :] ** (m - layers + 1), "loss": loss}


def frame_distance(gram: Tensor, target_diag) -> float:
    """||G/||G||_F − D/||D||_F||_F with D = diag(target): the GOF (OF when the target is constant) distance."""
    g = torch.as_tensor(gram, dtype=torch.float64)
    d = torch.diag(torch.as_tensor(np.asarray(target_diag, dtype=np.float64)))
    return float((g / g.norm() - d / d.norm()).norm())


def layer_frame_metrics(product: Tensor, means: Tensor, geometry: dict, layer: int) -> dict[str, float]:
    """GOF distances at the input of layer ``layer`` (1..M).

    ``product``: W_M⋯W_m (C, p); ``means``: uncentred class means h̄^{(m)} as rows (C, p). Returns
    ``gof_w`` (W Wᵀ vs diag(s^{2(M−m+1)})), ``gof_h`` (H̄ H̄ᵀ vs diag(mean_norm²)), ``gof_wh`` (W H̄ᵀ vs
    diag(σ a)), each 0 at the closed form, and ``mean_norm_rel_err``/``product_rel_err`` (max relative errors of
    the class-mean norms and of the product's per-class row norms against the closed form).
    """
    w = torch.as_tensor(product, dtype=torch.float64)
    h = torch.as_tensor(means, dtype=torch.float64)
    i = layer - 1
    target_w = geometry["product_singular"][i] ** 2
    target_h = geometry["mean_norm"][i] ** 2
    mean_norm = h.norm(dim=1).numpy()
    row_norm = w.norm(dim=1).numpy()
    return {
        "gof_w": frame_distance(w @ w.T, target_w),
        "gof_h": frame_distance(h @ h.T, target_h),
        "gof_wh": frame_distance(w @ h.T, geometry["output"]),
        "mean_norm_rel_err": float(np.max(np.abs(mean_norm - geometry["mean_norm"][i])
                                          / np.maximum(geometry["mean_norm"][i], 1e-300))),
        "product_rel_err": float(np.max(np.abs(row_norm - geometry["product_singular"][i])
                                        / np.maximum(geometry["product_singular"][i], 1e-300))),
    }
