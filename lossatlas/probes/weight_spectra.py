"""Data-free weight-matrix spectra: the ESD of each layer, its power-law tail α and the norm metrics.

Martin & Mahoney 2021, "Predicting trends in the quality of state-of-the-art neural networks without access to
training or testing data" (Nature Communications); Martin & Mahoney 2021, "Implicit self-regularization in deep
neural networks" (JMLR); Clauset, Shalizi & Newman 2009, "Power-law distributions in empirical data" (SIAM Review).

Per layer (``nn.Linear``; ``nn.Conv1d/2d/3d`` as WeightWatcher treats a Conv2d): the weight W (N × M, N ≥ M,
transposed if needed) and the eigenvalues λ_i = σ_i(W)² of WᵀW (divided by N when ``normalize``: the
correlation matrix X = WᵀW/N of the paper). A convolution of weight (out, in, k₁, k₂) gives k₁k₂ matrices
W[:, :, i, j], whose eigenvalues are pooled into one ESD; with ``conv2d_norm`` each slice is scaled by
1/√2, as WeightWatcher 0.7's ``analyze(conv2d_norm=True)`` does (its √(count/2) with count 1 when pooled).

The power law ρ(λ) ∝ λ^(−α) on λ ≥ x_min is fitted by Clauset–Shalizi–Newman: for every candidate x_min
(each eigenvalue above ``EVALS_THRESH`` but the largest) the continuous MLE α = 1 + n / Σ_{λ_i ≥ x_min}
ln(λ_i/x_min) over the n tail eigenvalues, and the Kolmogorov–Smirnov distance D = max_j |F(λ_j) − j/n|,
F(λ) = 1 − (λ/x_min)^(1−α), between the fit and the tail's empirical CDF; x_min minimises D (WeightWatcher's
WW_powerlaw). Then α̂ = α·log10 λ_max (weighted alpha), the stable rank ‖W‖_F²/‖W‖₂², ‖W‖₂,
log10 ‖W‖_F² and log10 ‖W‖₂² (WeightWatcher's log_norm and log_spectral_norm).

Correlation traps (Martin & Mahoney 2021): the entries of W are shuffled by a seeded permutation, which destroys
its correlations; the largest eigenvalue of the shuffled matrix is compared with the Marchenko–Pastur bulk edge
λ₊ = σ²(√N + √M)² (σ² the variance of W's entries; divided by N with ``normalize``) plus ``trap_sigmas``
Tracy–Widom scales s = σ²(√N + √M)(1/√N + 1/√M)^{1/3} (Johnstone 2001): above it, a few large entries
("a trap") dominate the spectrum.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from lossatlas.probes.base import Probe, ProbeContext, Result, register_probe
from lossatlas.probes.features import is_weight_layer
from lossatlas.probes.settings import check_finite_number

EVALS_THRESH = 1e-5  # eigenvalues of the unnormalised WᵀW at or below this are zero for the fit (as WeightWatcher)


def power_law_fit(evals: np.ndarray, *, thresh: float = 0.0) -> dict[str, float]:
    """Clauset–Shalizi–Newman fit of a power-law tail ρ(λ) ∝ λ^(−α), λ ≥ x_min, to ``evals``.

    Every value above ``thresh`` but the largest is a candidate x_min; for each, the continuous MLE
    α = 1 + n / Σ_{λ_i ≥ x_min} ln(λ_i/x_min) and the KS distance D = max_j |1 − (λ_j/x_min)^(1−α) − j/n|
    (j = 0 … n−1 over the sorted tail; D = 1 where α ≤ 1); the x_min of the smallest D wins (the first on ties).
    Returns ``alpha``, ``xmin``, ``D``, ``sigma`` = (α − 1)/√n (the MLE's standard error), ``num_tail`` = n and
    ``num_evals``; NaN values (and num_tail 0) with fewer than two eigenvalues above ``thresh``.
    """
    x = np.sort(np.asarray(evals, dtype=np.float64).ravel())
    x = x[x > thresh]
    n_all = x.size
    if n_all < 2:
        return {"alpha": math.nan, "xmin": math.nan, "D": math.nan, "sigma": math.nan, "num_tail": 0,
                "num_evals": int(n_all)}
    logs = np.log(x)
    tail_sums = np.cumsum(logs[::-1])[::-1]  # Σ_{j ≥ i} ln λ_j for every i
    n = (n_all - np.arange(n_all - 1)).astype(np.float64)  # tail sizes of the candidates x_min = λ_0 … λ_{n−2}
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + n / (tail_sums[:-1] - n * logs[:-1])
    ds = np.ones(n_all - 1)
    for i in range(n_all - 1):
        a = alphas[i]
        if a > 1.0 and np.isfinite(a):
            k = n_all - i
            ds[i] = np.max(np.abs(1.0 - (x[i:] / x[i]) ** (1.0 - a) - np.arange(k) / k))
    best = int(np.argmin(ds))
    alpha = float(alphas[best])
    return {"alpha": alpha, "xmin": float(x[best]), "D": float(ds[best]),
            "sigma": (alpha - 1.0) / math.sqrt(n[best]), "num_tail": int(n[best]), "num_evals": int(n_all)}


def layer_matrices(weight: torch.Tensor, *, conv2d_norm: bool = True) -> list[np.ndarray]:
    """The float64 N × M (N ≥ M) matrices of one layer's weight, as WeightWatcher slices them.

    A Linear weight (out, in) is one matrix; a convolution (out, in, k…) gives one matrix W[:, :, i…] per kernel
    position, each times 1/√2 with ``conv2d_norm``. Each is transposed when it has fewer rows than columns.
    """
    w = weight.detach().to(device="cpu", dtype=torch.float64).numpy()
    if w.ndim == 2:
        mats = [w]
    else:
        scale = math.sqrt(0.5) if conv2d_norm else 1.0
        flat = w.reshape(w.shape[0], w.shape[1], -1)
        mats = [flat[:, :, k] * scale for k in range(flat.shape[2])]
    return [m if m.shape[0] >= m.shape[1] else m.T for m in mats]


def squared_singular_values(mats: list[np.ndarray]) -> np.ndarray:
    """The pooled eigenvalues σ_i(W)² of WᵀW over every matrix, sorted ascending."""
    return np.sort(np.concatenate([np.linalg.svd(m, compute_uv=False) ** 2 for m in mats]))


def mp_bulk_edge(variance: float, n: int, m: int) -> tuple[float, float]:
    """(λ₊, s): the Marchenko–Pastur bulk edge of WᵀW and the Tracy–Widom scale of its largest eigenvalue.

    λ₊ = σ²(√N + √M)² for i.i.d. entries of variance σ², s = σ²(√N + √M)(1/√N + 1/√M)^{1/3} (Johnstone 2001,
    "On the distribution of the largest eigenvalue in principal components analysis").
    """
    rn, rm = math.sqrt(n), math.sqrt(m)
    return variance * (rn + rm) ** 2, variance * (rn + rm) * (1.0 / rn + 1.0 / rm) ** (1.0 / 3.0)


def spectral_layer_names(model: nn.Module) -> list[str]:
    """Names of every weight layer (Linear, Conv, transformers' Conv1D) with a weight, in ``named_modules`` order."""
    return [n for n, m in model.named_modules() if is_weight_layer(m) and getattr(m, "weight", None) is not None]


@register_probe
@dataclass(frozen=True, kw_only=True)
class WeightSpectra(Probe):
    """Per-layer weight spectra without data: power-law α, weighted α̂, norms and correlation traps.

    WeightWatcher's metrics (Martin & Mahoney 2021, "Predicting trends in the quality of state-of-the-art neural
    networks without access to training or testing data"), tracked across checkpoints. Needs no data set.

    Attributes:
        normalize: divide the eigenvalues of WᵀW by N, the ESD of X = WᵀW/N (False: σ², WeightWatcher's scale).
        conv2d_norm: scale each convolution slice by 1/√2, as WeightWatcher's default conv2d_norm does.
        min_evals: layers with fewer eigenvalues get NaN for the power-law fit (their norms are still computed).
        trap_sigmas: a correlation trap is a shuffled-W eigenvalue above λ₊ + trap_sigmas Tracy–Widom scales.
        seed: seed of the permutation that shuffles each layer's entries.
    """

    name: ClassVar[str] = "weight_spectra"
    summary: ClassVar[str] = "data-free weight spectra per layer: power-law alpha, weighted alpha, norms, traps"
    section: ClassVar[str] = "representations"
    title: ClassVar[str] = "Weight spectra (data-free)"
    figure: ClassVar[str | None] = "weight_spectra"
    needs_data: ClassVar[bool] = False
    normalize: bool = True
    conv2d_norm: bool = True
    min_evals: int = 8
    trap_sigmas: float = 4.0
    seed: int = 0

    def validate(self) -> None:
        """ValueError for ``min_evals`` < 2, a ``trap_sigmas`` that is not finite and ≥ 0, or a non-integer seed."""
        if isinstance(self.min_evals, bool) or not isinstance(self.min_evals, int) or self.min_evals < 2:
            raise ValueError(f"min_evals must be an integer >= 2, got {self.min_evals!r}")
        check_finite_number("trap_sigmas", self.trap_sigmas, minimum=0.0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def run(self, ctx: ProbeContext) -> Result:
        """Every Linear/Conv layer's ESD, power-law fit, norms and correlation-trap check.

        Per layer (dim "layer"): ``alpha``, ``xmin``, ``ks_distance``, ``alpha_sigma``, ``num_tail``, ``num_evals``,
        ``lambda_max``, ``alpha_weighted`` = α·log10 λ_max, ``stable_rank``, ``spectral_norm`` ‖W‖₂, ``log_norm``
        log10 ‖W‖_F², ``log_spectral_norm`` log10 ‖W‖₂², ``rand_lambda_max``, ``mp_edge``, ``tw_scale``,
        ``num_traps`` and ``correlation_trap``; ``esd`` (layer, eig) the sorted eigenvalues padded with NaN.
        Scalars: the layer means ``alpha_mean``, ``alpha_weighted_mean``, ``log_norm_mean``,
        ``log_spectral_norm_mean``, ``stable_rank_mean`` (over layers with a fit for the α ones) and ``num_trap_layers``.
        ValueError when the model has no Linear or Conv layer.
        """
        start = time.perf_counter()
        names = spectral_layer_names(ctx.model)
        if not names:
            raise ValueError(f"{type(ctx.model).__name__} has no Linear or Conv layer; weight_spectra has nothing to measure")
        modules = dict(ctx.model.named_modules())
        rows: dict[str, list] = {k: [] for k in (
            "alpha", "xmin", "ks_distance", "alpha_sigma", "num_tail", "num_evals", "lambda_max", "alpha_weighted",
            "stable_rank", "spectral_norm", "log_norm", "log_spectral_norm", "rand_lambda_max", "mp_edge",
            "tw_scale", "num_traps", "correlation_trap", "matrix_n", "matrix_m")}
        esds = []
        for index, name in enumerate(names):
            mats = layer_matrices(modules[name].weight, conv2d_norm=self.conv2d_norm)
            n, m = mats[0].shape
            raw = squared_singular_values(mats)  # σ², WeightWatcher's scale
            scale = 1.0 / n if self.normalize else 1.0
            evals = raw * scale
            fit = power_law_fit(raw, thresh=EVALS_THRESH)  # the threshold applies to σ², as WeightWatcher's
            if fit["num_evals"] < self.min_evals:
                fit = {**fit, "alpha": math.nan, "xmin": math.nan, "D": math.nan, "sigma": math.nan, "num_tail": 0}
            lam_max = float(evals[-1])
            frob2 = float(raw.sum())  # ‖W‖_F² over the (scaled) slices
            spec2 = float(raw[-1])  # ‖W‖₂² (the largest over the slices)
            # the shuffled W: a seeded permutation of every slice's entries, which keeps their distribution only
            rng = np.random.default_rng([self.seed, index])
            rand = squared_singular_values([rng.permutation(mat.ravel()).reshape(mat.shape) for mat in mats])
            entries = np.concatenate([mat.ravel() for mat in mats])
            edge, tw = mp_bulk_edge(float(entries.var()), n, m)
            cut = edge + self.trap_sigmas * tw
            traps = int((rand > cut).sum())
            values = {
                "alpha": fit["alpha"], "xmin": fit["xmin"] * scale, "ks_distance": fit["D"], "alpha_sigma": fit["sigma"],
                "num_tail": fit["num_tail"], "num_evals": int(raw.size), "lambda_max": lam_max,
                "alpha_weighted": fit["alpha"] * math.log10(lam_max) if lam_max > 0 else math.nan,
                "stable_rank": frob2 / spec2 if spec2 > 0 else math.nan, "spectral_norm": math.sqrt(spec2),
                "log_norm": math.log10(frob2) if frob2 > 0 else -math.inf,
                "log_spectral_norm": math.log10(spec2) if spec2 > 0 else -math.inf,
                "rand_lambda_max": float(rand[-1]) * scale, "mp_edge": edge * scale, "tw_scale": tw * scale,
                "num_traps": traps, "correlation_trap": traps > 0, "matrix_n": n, "matrix_m": m,
            }
            for k, v in values.items():
                rows[k].append(v)
            esds.append(evals)

        res = self.new_result(ctx.step)
        layer = {"layer": np.array(names, dtype=str)}
        ints = {"num_tail", "num_evals", "num_traps", "matrix_n", "matrix_m"}
        for k, v in rows.items():
            dtype = np.int64 if k in ints else (np.bool_ if k == "correlation_trap" else np.float64)
            res.add(k, np.array(v, dtype=dtype), ("layer",), layer)
        width = max(e.size for e in esds)
        padded = np.full((len(esds), width), np.nan)
        for i, e in enumerate(esds):
            padded[i, : e.size] = e
        res.add("esd", padded, ("layer", "eig"))
        alpha = np.array(rows["alpha"])
        fitted = np.isfinite(alpha)

        def mean(key: str, mask: np.ndarray | None = None) -> np.float64:
            v = np.array(rows[key], dtype=np.float64)
            v = v[mask] if mask is not None else v
            v = v[np.isfinite(v)]
            return np.float64(v.mean()) if v.size else np.float64(np.nan)

        res.add("alpha_mean", mean("alpha", fitted))
        res.add("alpha_weighted_mean", mean("alpha_weighted", fitted))
        res.add("log_norm_mean", mean("log_norm"))
        res.add("log_spectral_norm_mean", mean("log_spectral_norm"))
        res.add("stable_rank_mean", mean("stable_rank"))
        res.add("num_trap_layers", np.int64(sum(rows["correlation_trap"])))
        res.meta.update({
            "esd": "eigenvalues of WᵀW/N" if self.normalize else "eigenvalues of WᵀW (σ²)",
            "fit": "Clauset-Shalizi-Newman: continuous MLE, x_min by the smallest KS distance",
            "conv": "kernel-position slices pooled" + (", each x 1/sqrt(2)" if self.conv2d_norm else ""),
            "evals_thresh": EVALS_THRESH,
            "elapsed_s": time.perf_counter() - start,
        })
        return res


__all__ = ["EVALS_THRESH", "WeightSpectra", "layer_matrices", "mp_bulk_edge", "power_law_fit",
           "spectral_layer_names", "squared_singular_values"]
