"""Representation geometry: alignment, uniformity, Wasserstein uniformity, tolerance, RankMe.

Wang & Isola 2020 (ICML, alignment and uniformity); Fang et al. 2024 (ICLR, "Rethinking the
uniformity metric in self-supervised learning", W2 uniformity); Garrido, Balestriero, Najman,
LeCun 2023 (ICML, RankMe).

Metric functions take feature matrices (N, d). Wang & Isola's alignment and uniformity are the
formulas of the reference code and expect L2-normalised rows (``normalize_rows`` does that and
says whether it had to); W2 uniformity and tolerance normalise themselves (cosines); RankMe uses
the raw features. The ``uniformity`` probe collects a model's features and applies them all.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from lossatlas.batches import map_inputs
from lossatlas.probes.base import Probe, ProbeContext, Result, register_probe
from lossatlas.probes.features import (
    CAPTURES,
    Rebatched,
    collect_features,
    model_params,
    next_token_labels,
    resolve_module,
)
from lossatlas.probes.settings import MODES, check_choice, check_finite_number, check_nonneg_int

NOT_NORMALIZED_WARNING = "features were not L2-normalized; normalized them"
AUGMENTATIONS: tuple[str, ...] = ("none", "gaussian_noise")
RANKME_EPS = 1e-7
UNIT_TOL = 1e-6

Augment = Callable[[Tensor, torch.Generator], Tensor]


def normalize_rows(z: Tensor, tol: float = UNIT_TOL) -> tuple[Tensor, bool]:
    """``(z / ||z||₂ row-wise in float64, changed)``; ``changed`` is True if some row norm was not 1 ± tol."""
    z = z.to(torch.float64)
    norms = z.norm(dim=1, keepdim=True)
    if bool(((norms - 1.0).abs() <= tol).all()):
        return z, False
    if bool((norms == 0).any()):
        raise ValueError("some feature rows are all zero and cannot be L2-normalized; drop them or pick another module")
    return z / norms, True


def alignment_loss(x: Tensor, y: Tensor, alpha: float = 2.0) -> float:
    """Wang & Isola 2020 alignment E ||f(x) − f(y)||₂^α over positive pairs (rows of x, y), α = 2.

    Unit vectors at angle φ give (2 − 2cos φ)^{α/2}; identical pairs 0.
    """
    if x.shape != y.shape:
        raise ValueError(f"positive pairs need equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    d = (x.to(torch.float64) - y.to(torch.float64)).norm(p=2, dim=1)
    return float(d.pow(alpha).mean())


def uniformity_loss(z: Tensor, t: float = 2.0) -> float:
    """Wang & Isola 2020 uniformity log E_{i<j} exp(−t ||z_i − z_j||²), t = 2 (pairs i < j via pdist).

    Computed as logsumexp − log(#pairs) so that large t does not underflow. Closed forms:
    all rows equal ⇒ 0; a regular simplex of N unit vectors ⇒ −2tN/(N−1).
    """
    n = z.shape[0]
    if n < 2:
        raise ValueError("uniformity needs at least two feature rows")
    d2 = torch.pdist(z.to(torch.float64), p=2).pow(2)  # (N(N−1)/2,)
    return float(torch.logsumexp(-t * d2, dim=0) - math.log(d2.numel()))


def w2_uniformity(z: Tensor) -> float:
    """Wasserstein uniformity W2 = sqrt(||μ||² + 1 + tr Σ − (2/√m) tr Σ^{1/2}) (Fang et al. ICLR 2024).

    The 2-Wasserstein distance between N(μ, Σ) of the L2-normalised features (biased covariance
    1/N) and N(0, I/m), m the feature width; Σ^{1/2} from |eigenvalues| as in the reference code.
    0 for uniform on the sphere, √2 for complete collapse, sqrt(2(1 − √(k/m))) for a k-dim subspace.
    Lower is more uniform (the paper's uniformity metric is −W2).
    """
    z = z.to(torch.float64)
    z = z / z.norm(dim=1, keepdim=True)
    n, m = z.shape
    mu = z.mean(0)
    zc = z - mu
    sigma = zc.T @ zc / n  # (m, m), biased
    sqrt_trace = torch.linalg.eigvalsh(sigma).abs().sqrt().sum()
    inner = mu @ mu + 1.0 + torch.trace(sigma) - 2.0 / math.sqrt(m) * sqrt_trace
    return float(inner.clamp(min=0.0).sqrt())


def tolerance(z: Tensor, labels: Tensor) -> float:
    """Wang & Liu 2021 tolerance: mean cosine similarity over same-class pairs i ≠ j.

    Exact in O(N d) from class sums: Σ_{i≠j∈c} ẑ_iᵀẑ_j = ||Σ_{i∈c} ẑ_i||² − n_c, over Σ_c n_c(n_c − 1) pairs.
    """
    z = z.to(torch.float64)
    z = z / z.norm(dim=1, keepdim=True)
    labels = labels.reshape(-1).long()
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    sums = z.new_zeros(counts.numel(), z.shape[1]).index_add_(0, inverse, z)
    counts = counts.to(torch.float64)
    pairs = float((counts * (counts - 1)).sum())
    if pairs == 0:
        raise ValueError("tolerance needs at least one class with two examples")
    return float(((sums**2).sum(1) - counts).sum() / pairs)


def singular_values(z: Tensor, center: bool = False) -> Tensor:
    """Singular values of the (N, d) feature matrix, descending (the dimensional-collapse spectrum)."""
    z = z.to(torch.float64)
    if center:
        z = z - z.mean(0)
    return torch.linalg.svdvals(z)


def rankme(z: Tensor, eps: float = RANKME_EPS, center: bool = False) -> float:
    """RankMe = exp(−Σ_k p_k log p_k), p_k = σ_k/||σ||₁ + ε, ε = 1e-7 (Garrido et al. ICML 2023).

    On the raw features (no centring unless ``center``). k equal singular values ⇒ k, rank 1 ⇒ 1,
    σ = (2, 1, 1) ⇒ 2^{3/2}.
    """
    s = singular_values(z, center)
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def subsample_rows(z: Tensor, max_rows: int | None, seed: int = 0) -> Tensor:
    """At most ``max_rows`` rows of ``z`` drawn without replacement with a seeded generator (all if None)."""
    if max_rows is None or z.shape[0] <= max_rows:
        return z
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(z.shape[0], generator=g)[:max_rows]
    return z[idx.to(z.device)]


def gaussian_noise(std: float) -> Augment:
    """An augmentation x ↦ x + std·ε, ε ∼ N(0, I) drawn from the given generator.

    Dict inputs: every floating tensor (``pixel_values``, ``inputs_embeds``) gets its noise; ValueError when
    there is none (token ids cannot be perturbed so).
    """
    def noisy(t: Tensor, generator: torch.Generator) -> Tensor:
        if not t.is_floating_point():
            return t
        noise = torch.randn(t.shape, generator=generator, dtype=t.dtype)
        return t + std * noise.to(t.device)

    def augment(x, generator: torch.Generator):
        if isinstance(x, Tensor):
            return noisy(x, generator)
        if not any(isinstance(v, Tensor) and v.is_floating_point() for v in x.values()):
            raise ValueError(f"augmentation gaussian_noise needs floating inputs, but the inputs {sorted(x)} are all "
                             "integer (token ids); use augmentation='none'")
        return map_inputs(lambda t: noisy(t, generator), x)
    return augment


def positive_pair_features(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    augment: Augment,
    module: str | None = None,
    mode: str = "eval",
    *,
    capture: str = "input",
    params: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    next_token: bool = False,
) -> tuple[Tensor, Tensor]:
    """Features of two augmented views ``augment(x, g)`` of every input: (Z₁, Z₂), each (N, p) float64."""
    g = torch.Generator().manual_seed(seed)
    views: tuple[list, list] = ([], [])
    for x, y in batches:
        views[0].append((augment(x, g), y))
        views[1].append((augment(x, g), y))
    z1, _ = collect_features(model, views[0], module, mode, capture=capture, params=params, next_token=next_token)
    z2, _ = collect_features(model, views[1], module, mode, capture=capture, params=params, next_token=next_token)
    return z1, z2


@register_probe
@dataclass(frozen=True, kw_only=True)
class Uniformity(Probe):
    """Alignment, uniformity (Wang & Isola 2020), W2 uniformity (Fang et al. 2024), tolerance, RankMe.

    Features: the input (``capture="input"``) or output of ``module`` (None: the last nn.Linear).
    Uniformity uses at most ``max_pairs_examples`` rows (seeded subsample) for its O(N²) pairs;
    alignment needs positive pairs, made by ``augmentation`` ("gaussian_noise" with ``noise_std``)
    and is left out with "none".
    """

    name: ClassVar[str] = "uniformity"
    summary: ClassVar[str] = "alignment, uniformity, W2 uniformity, tolerance, RankMe of features"
    section: ClassVar[str] = "representations"
    figure: ClassVar[str | None] = "uniformity"
    module: str | None = None
    capture: str = "input"
    mode: str = "eval"
    t: float = 2.0
    alpha: float = 2.0
    max_pairs_examples: int | None = 4096
    max_examples: int | None = None
    batch_size: int | None = None
    augmentation: str = "none"
    noise_std: float = 0.1
    center_rankme: bool = False
    seed: int = 0

    def validate(self) -> None:
        """ValueError for a setting out of range.

        Refuses an unknown ``capture``, ``mode`` or ``augmentation``; ``t``/``alpha`` not finite and > 0;
        ``noise_std`` not finite and ≥ 0; a negative ``seed``; ``max_pairs_examples`` < 2 and
        ``max_examples``/``batch_size`` < 1 (None passes for all three).
        """
        check_choice("capture", self.capture, CAPTURES)
        check_choice("mode", self.mode, MODES)
        check_choice("augmentation", self.augmentation, AUGMENTATIONS)
        check_finite_number("t", self.t, minimum=0.0, strict=True)
        check_finite_number("alpha", self.alpha, minimum=0.0, strict=True)
        check_finite_number("noise_std", self.noise_std, minimum=0.0)
        check_nonneg_int("seed", self.seed)
        for key in ("max_pairs_examples", "max_examples", "batch_size"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value <= (1 if key == "max_pairs_examples" else 0)):
                raise ValueError(f"{key} must be a positive integer (≥ 2 for pairs) or None, got {value!r}")

    def run(self, ctx: ProbeContext) -> Result:
        """Feature-geometry scalars of the captured features Z (N, p) and their singular values.

        ``uniformity`` log E_{i<j} exp(−t‖ẑ_i − ẑ_j‖²) on at most ``max_pairs_examples`` unit rows;
        ``w2_uniformity`` the 2-Wasserstein distance from N(μ, Σ) of ẑ to N(0, I/p);
        ``tolerance`` the mean same-class cosine (when a class has ≥ 2 examples); ``rankme`` exp(−Σ p_k log p_k),
        p_k = σ_k/‖σ‖₁ + ε; ``singular_values`` σ_k; with ``augmentation`` ``alignment`` E‖ẑ₁ − ẑ₂‖^α over
        the two augmented views.
        """
        start = time.perf_counter()
        name, _ = resolve_module(ctx.model, self.module)
        params = model_params(ctx.model, ctx.device, ctx.dtype)
        data = Rebatched(ctx.data, self.batch_size, self.max_examples, ctx.device, ctx.dtype)
        next_token = next_token_labels(ctx.model, ctx.loss)  # a causal LM's token t has the label of token t + 1
        z, labels = collect_features(ctx.model, data, name, self.mode, capture=self.capture, params=params,
                                     next_token=next_token)
        unit, changed = normalize_rows(z)
        warnings = [NOT_NORMALIZED_WARNING] if changed else []
        res = self.new_result(ctx.step)

        def scalar(key: str, v: float) -> None:
            res.add(key, np.float64(v))

        if self.augmentation == "gaussian_noise":
            z1, z2 = positive_pair_features(ctx.model, data, gaussian_noise(self.noise_std), name, self.mode,
                                            capture=self.capture, params=params, seed=self.seed,
                                            next_token=next_token)
            scalar("alignment", alignment_loss(normalize_rows(z1)[0], normalize_rows(z2)[0], self.alpha))
        pairs = subsample_rows(unit, self.max_pairs_examples, self.seed)
        scalar("uniformity", uniformity_loss(pairs, self.t))
        scalar("w2_uniformity", w2_uniformity(z))
        if int(torch.unique(labels, return_counts=True)[1].max()) >= 2:
            scalar("tolerance", tolerance(z, labels))
        scalar("rankme", rankme(z, center=self.center_rankme))
        sv = singular_values(z, self.center_rankme)
        res.add("singular_values", sv.cpu().numpy(), ("component",), {"component": np.arange(sv.numel())})
        res.meta.update({
            "feature_module": name,
            "capture": self.capture,
            "num_examples": int(z.shape[0]),
            "feature_width": int(z.shape[1]),
            "uniformity_examples": int(pairs.shape[0]),
            "rankme_eps": RANKME_EPS,
            "rankme_centred": self.center_rankme,
            "warnings": warnings,
            "mode": self.mode,
            "elapsed_s": time.perf_counter() - start,
        })
        return res
