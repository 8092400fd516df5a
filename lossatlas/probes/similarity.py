"""Representation similarity between the layers of two checkpoints or two runs: CKA, SVCCA and PWCCA.

- Linear and RBF CKA (Kornblith, Norouzi, Lee, Hinton 2019, "Similarity of neural network representations
  revisited"): CKA(K, L) = HSIC(K, L) / √(HSIC(K, K) HSIC(L, L)) of the Gram matrices K = XXᵀ (linear) or
  K_ij = exp(−‖x_i − x_j‖² / (2 t² m)), m the median squared distance, t = ``rbf_threshold`` (RBF, as
  google-research's ``gram_rbf``). The biased HSIC is tr(KHLH)/(n − 1)², H = I − 11ᵀ/n; the unbiased one
  (``unbiased``; Song, Smola, Gretton, Bedo, Borgwardt 2012, "Feature selection via dependence maximization")
  is [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n − 1)(n − 2)) − 2/(n − 2)·1ᵀK̃L̃1] / (n(n − 3)), K̃ = K with a zero diagonal.
- SVCCA (Raghu, Gilmer, Yosinski, Sohl-Dickstein 2017, "SVCCA: Singular vector canonical correlation analysis
  for deep learning dynamics and interpretability"): each centred (n, p) representation is cut to the top
  singular directions that hold ``svcca_keep`` of its variance, then the mean canonical correlation.
- PWCCA (Morcos, Raghu, Bengio 2018, "Insights on representational similarity in neural networks with
  canonical correlation"): Σ_i α̃_i ρ_i, α̃_i ∝ Σ_j |⟨h_i, x_j⟩| over the neurons x_j (centred columns) of the
  representation with fewer neurons, h_i its unit-norm canonical variates.

Canonical correlations ρ_i are the singular values of Q_xᵀQ_y, Q an orthonormal basis of the centred columns
(singular values above ``RANK_RTOL`` · the largest). CKA and SVCCA are invariant to orthogonal transforms and
isotropic scaling of either representation; PWCCA to isotropic scaling only (its weights use the neuron basis).
CCA needs more examples than the representation's rank: with n ≤ rank + 1 every ρ is 1 (noted in the meta).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lossatlas.probes.base import Probe, ProbeContext, Result, register_probe
from lossatlas.probes.features import (
    CAPTURES,
    Rebatched,
    depth_module_names,
    model_params,
    next_token_labels,
    resolve_module,
    stream_features,
)
from lossatlas.probes.settings import MODES, check_choice, check_finite_number

METRICS: tuple[str, ...] = ("linear_cka", "rbf_cka", "svcca", "pwcca")
RANK_RTOL = 1e-10  # singular values below this fraction of the largest span no direction (CCA bases)


# ---- CKA --------------------------------------------------------------------------------------------------------
def gram_linear(x: np.ndarray) -> np.ndarray:
    """The linear Gram matrix K = XXᵀ of an (n, p) representation."""
    x = np.asarray(x, dtype=np.float64)
    return x @ x.T


def gram_rbf(x: np.ndarray, threshold: float = 1.0) -> np.ndarray:
    """RBF Gram K_ij = exp(−d_ij² / (2 t² m)), m the median of all d_ij² (diagonal included; Kornblith et al. 2019)."""
    g = gram_linear(x)
    sq = np.diag(g)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0)
    m = float(np.median(d2))
    if m <= 0.0:
        raise ValueError("the RBF bandwidth is 0: more than half the pairs of examples share one representation")
    return np.exp(-d2 / (2.0 * threshold ** 2 * m))


def center_gram(gram: np.ndarray, unbiased: bool = False) -> np.ndarray:
    """HKH (biased), or the U-centred K̃ of Song et al. 2012 whose inner products give the unbiased HSIC × n(n − 3)."""
    g = np.array(gram, dtype=np.float64, copy=True)
    n = g.shape[0]
    if unbiased:
        if n < 4:
            raise ValueError(f"the unbiased HSIC needs at least 4 examples, got {n}")
        np.fill_diagonal(g, 0.0)
        means = g.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        g -= means[:, None] + means[None, :]
        np.fill_diagonal(g, 0.0)
    else:
        means = g.mean(0)
        means -= means.mean() / 2
        g -= means[:, None] + means[None, :]
    return g


def cka_centered(kc: np.ndarray, lc: np.ndarray) -> float:
    """CKA of two centred Gram matrices: ⟨K_c, L_c⟩ / (‖K_c‖_F ‖L_c‖_F) (NaN when one is 0)."""
    denom = float(np.linalg.norm(kc) * np.linalg.norm(lc))
    return float(np.vdot(kc, lc)) / denom if denom > 0 else math.nan


def cka(x: np.ndarray, y: np.ndarray, *, kernel: str = "linear", unbiased: bool = False,
        rbf_threshold: float = 1.0) -> float:
    """CKA between two (n, ·) representations of the same n examples (``kernel`` linear or rbf)."""
    gram = gram_linear if kernel == "linear" else (lambda a: gram_rbf(a, rbf_threshold))
    return cka_centered(center_gram(gram(x), unbiased), center_gram(gram(y), unbiased))


# ---- CCA --------------------------------------------------------------------------------------------------------
def _basis(x: np.ndarray, keep: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(Q, s): an orthonormal (n, k) basis of the centred columns of ``x`` and their singular values.

    ``keep`` (SVCCA): only the top directions holding that fraction of the variance Σ s².
    """
    xc = np.asarray(x, dtype=np.float64)
    xc = xc - xc.mean(0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    rank = int((s > RANK_RTOL * s[0]).sum()) if s.size and s[0] > 0 else 0
    if keep is not None and rank:
        var = np.cumsum(s[:rank] ** 2) / np.sum(s[:rank] ** 2)
        rank = min(rank, int(np.searchsorted(var, keep - 1e-12)) + 1)  # the fewest directions holding ≥ keep
    return u[:, :rank], s[:rank]


def canonical_correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The canonical correlations ρ_1 ≥ … ≥ ρ_k (k = min of the ranks) of two (n, ·) representations."""
    qx, _ = _basis(x)
    qy, _ = _basis(y)
    return np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0.0, 1.0)


def svcca(x: np.ndarray, y: np.ndarray, keep: float = 0.99) -> float:
    """SVCCA: the mean canonical correlation of the top-``keep``-variance singular directions of each (Raghu et al. 2017)."""
    qx, sx = _basis(x, keep)
    qy, sy = _basis(y, keep)
    if not qx.shape[1] or not qy.shape[1]:
        return math.nan
    return float(np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0.0, 1.0).mean())


def pwcca(x: np.ndarray, y: np.ndarray) -> float:
    """PWCCA Σ α̃_i ρ_i, α̃_i ∝ Σ_j |⟨h_i, x_j⟩| over the representation with fewer neurons (Morcos et al. 2018)."""
    if np.asarray(y).shape[1] < np.asarray(x).shape[1]:
        x, y = y, x  # the weights come from the representation with fewer neurons (x)
    qx, _ = _basis(x)
    qy, _ = _basis(y)
    if not qx.shape[1] or not qy.shape[1]:
        return math.nan
    a, rho, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)
    h = qx @ a  # the canonical variates of x, unit norm and centred (n, k)
    xc = np.asarray(x, dtype=np.float64) - np.asarray(x, dtype=np.float64).mean(0)
    alpha = np.abs(h.T @ xc).sum(1)  # Σ_j |⟨h_i, x_j⟩| over the neurons x_j
    return float(np.dot(alpha / alpha.sum(), np.clip(rho, 0.0, 1.0)))


# ---- the probe ----------------------------------------------------------------------------------------------------
@register_probe
@dataclass(frozen=True, kw_only=True)
class Similarity(Probe):
    """Layer × layer representation similarity of this checkpoint and another: CKA, SVCCA, PWCCA.

    The other checkpoint is ``to_step`` of this run, or of the run ``other`` (at this checkpoint's step when
    ``to_step`` is None). Both models see the same examples (Kornblith et al. 2019; Raghu et al. 2017; Morcos et al. 2018).

    Attributes:
        to_step: the step of the other checkpoint (None with --other: this checkpoint's step).
        other: another run file (.h5) whose checkpoint is compared (None: this run).
        layers: "depth" (every Linear/Conv layer) or module names as a JSON list, the same names in both models.
        capture: compare each layer's input or its output.
        metrics: which similarities to compute, any of linear_cka, rbf_cka, svcca, pwcca (default all).
        unbiased: CKA from the unbiased HSIC estimator of Song et al. 2012 (small samples).
        rbf_threshold: the RBF bandwidth as a fraction t of the median distance, exp(−d²/(2t²·median d²)).
        svcca_keep: the fraction of variance SVCCA keeps of each representation before CCA.
        max_examples: examples fed to both models (the Gram matrices are n × n).
        batch_size: examples per forward pass (None: the data set's own batches).
        mode: the module's train/eval flag while features are taken.
    """

    name: ClassVar[str] = "similarity"
    summary: ClassVar[str] = "layer x layer CKA (linear, RBF), SVCCA and PWCCA between two checkpoints or runs"
    section: ClassVar[str] = "representations"
    title: ClassVar[str] = "Representation similarity"
    figure: ClassVar[str | None] = "similarity"
    usage: ClassVar[str] = "--step LAST --to-step 0"
    to_step: int | None = None
    other: str | None = None
    layers: str | tuple[str, ...] = "depth"
    capture: str = "output"
    metrics: tuple[str, ...] = METRICS
    unbiased: bool = False
    rbf_threshold: float = 1.0
    svcca_keep: float = 0.99
    max_examples: int | None = 512
    batch_size: int | None = None
    mode: str = "eval"

    def validate(self) -> None:
        """ValueError for a setting out of range.

        Refuses an unknown metric, capture or mode, a bad ``layers``, an RBF threshold ≤ 0, a ``svcca_keep``
        outside (0, 1], or an example count < 4.
        """
        if isinstance(self.metrics, str) or not self.metrics:
            raise ValueError(f"metrics must be a non-empty list of {', '.join(METRICS)}, got {self.metrics!r}")
        for m in self.metrics:
            check_choice("metric", m, METRICS)
        check_choice("capture", self.capture, CAPTURES)
        check_choice("mode", self.mode, MODES)
        if not (self.layers == "depth" or (isinstance(self.layers, (tuple, list)) and self.layers
                                           and all(isinstance(n, str) for n in self.layers))):
            raise ValueError(f"layers must be 'depth' or a list of module names, got {self.layers!r}")
        check_finite_number("rbf_threshold", self.rbf_threshold, minimum=0.0, strict=True)
        check_finite_number("svcca_keep", self.svcca_keep, minimum=0.0, strict=True)
        if self.svcca_keep > 1.0:
            raise ValueError(f"svcca_keep must be in (0, 1], got {self.svcca_keep}")
        for key, low in (("max_examples", 4), ("batch_size", 1)):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"{key} must be an integer >= {low} or None, got {value!r}")
        if self.to_step is not None and (isinstance(self.to_step, bool) or not isinstance(self.to_step, int)):
            raise ValueError(f"to_step must be a checkpoint step (an integer), got {self.to_step!r}")

    def _names(self, model) -> list[str]:
        if self.layers == "depth":
            return depth_module_names(model)
        return [resolve_module(model, n)[0] for n in self.layers]

    def _features(self, model, ctx: ProbeContext, params) -> dict[str, np.ndarray]:
        """Each layer's (n, p) float64 features over the first ``max_examples`` examples."""
        names = self._names(model)
        data = Rebatched(ctx.data, self.batch_size, self.max_examples, ctx.device, ctx.dtype)
        chunks: dict[str, list] = {n: [] for n in names}
        for feats, _ in stream_features(model, data, names, capture=self.capture, mode=self.mode, params=params,
                                        next_token=next_token_labels(model, ctx.loss)):
            for n in names:
                chunks[n].append(feats[n].cpu().numpy())
        return {n: np.concatenate(c) for n, c in chunks.items()}

    def _other(self, ctx: ProbeContext):
        """(model, params, step, source) of the checkpoint compared with this one."""
        if self.other is not None:
            if ctx.model_of_run is None:
                raise ValueError("similarity with other needs the runner (ctx.model_of_run); run it on a run file")
            step = self.to_step if self.to_step is not None else ctx.step
            model = ctx.model_of_run(str(self.other), int(step))
            return model, None, int(step), str(self.other)
        if self.to_step is None:
            raise ValueError("similarity needs the other checkpoint: give to_step (--to-step STEP) or other (--other RUN)")
        if ctx.state_at is None:
            raise ValueError("similarity needs the other checkpoint (ctx.state_at); run it on a run file")
        state = ctx.state_at(int(self.to_step))
        mine = model_params(ctx.model, ctx.device, ctx.dtype) or {
            **dict(ctx.model.named_parameters()), **dict(ctx.model.named_buffers())}
        params = {k: (state[k].to(device=v.device, dtype=v.dtype) if k in state else v) for k, v in mine.items()}
        return ctx.model, params, int(self.to_step), "this run"

    def run(self, ctx: ProbeContext) -> Result:
        """The similarity matrices of every pair of layers of this checkpoint (rows) and the other (columns).

        ``linear_cka``, ``rbf_cka``, ``svcca``, ``pwcca`` as (layer_a, layer_b) matrices: rows the layers of this
        checkpoint, columns those of the other; with the same layer names, their diagonals' means ``*_diag_mean``.

        ValueError without a second checkpoint, for fewer than 4 examples or an RBF bandwidth of 0.
        """
        start = time.perf_counter()
        other_model, other_params, other_step, source = self._other(ctx)
        fa = self._features(ctx.model, ctx, model_params(ctx.model, ctx.device, ctx.dtype))
        fb = self._features(other_model, ctx, other_params)
        n = next(iter(fa.values())).shape[0]
        if n < 4:
            raise ValueError(f"similarity needs at least 4 examples, got {n}")
        na, nb = list(fa), list(fb)
        res = self.new_result(ctx.step)
        coords = {"layer_a": np.array(na, dtype=str), "layer_b": np.array(nb, dtype=str)}
        grams = {}
        for kernel in ("linear", "rbf"):
            if f"{kernel}_cka" in self.metrics:
                gram = gram_linear if kernel == "linear" else (lambda a: gram_rbf(a, self.rbf_threshold))
                ka = [center_gram(gram(fa[k]), self.unbiased) for k in na]
                kb = [center_gram(gram(fb[k]), self.unbiased) for k in nb]
                grams[kernel] = np.array([[cka_centered(a, b) for b in kb] for a in ka])
        for metric in self.metrics:
            if metric == "linear_cka":
                mat = grams["linear"]
            elif metric == "rbf_cka":
                mat = grams["rbf"]
            elif metric == "svcca":
                mat = np.array([[svcca(fa[a], fb[b], self.svcca_keep) for b in nb] for a in na])
            else:
                mat = np.array([[pwcca(fa[a], fb[b]) for b in nb] for a in na])
            res.add(metric, mat, ("layer_a", "layer_b"), coords)
            if na == nb:
                res.add(f"{metric}_diag_mean", np.float64(np.nanmean(np.diag(mat))))
        notes = []
        saturated = [k for k, f in (*fa.items(), *fb.items()) if f.shape[1] >= n - 1]  # CCA has no room left
        if saturated and any(m in self.metrics for m in ("svcca", "pwcca")):
            notes.append(f"{len(set(saturated))} layer(s) have at least n - 1 = {n - 1} features: their canonical "
                         "correlations saturate at 1; use more examples (--max-examples)")
        res.meta.update({"from_step": ctx.step, "to_step": other_step, "other": source, "num_examples": n,
                         "hsic": "unbiased (Song et al. 2012)" if self.unbiased else "biased tr(KHLH)/(n-1)^2",
                         "notes": notes, "elapsed_s": time.perf_counter() - start})
        return res


__all__ = ["METRICS", "Similarity", "canonical_correlations", "center_gram", "cka", "cka_centered", "gram_linear",
           "gram_rbf", "pwcca", "svcca"]
