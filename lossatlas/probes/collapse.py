"""Neural collapse NC1–NC4, bias collapse, minority collapse and NC across depth.

Papyan, Han, Donoho 2020 (PNAS, "Prevalence of neural collapse during the terminal phase of deep
learning training"); Zhu et al. 2021 (NeurIPS); Dang et al. 2023 (ICML, deep linear nets).

Metric functions take means, covariances, classifier rows as tensors, so closed-form cases
(simplex ETFs) are direct test inputs. The ``collapse`` probe streams the features of
a model through ``ClassStatistics`` (two passes, float64) and applies them.

Conventions: h_i = input of the last linear layer; μ_G = sample-weighted mean;
M = [μ_1 − μ_G, …, μ_C − μ_G] (here as rows, ``centred_means`` (C, p)); W (C, p); standard
deviations are population (ddof = 0); C counts the classes present in the data.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from lossatlas.probes.base import Probe, ProbeContext, Result, register_probe
from lossatlas.probes.features import (
    ClassStatistics,
    Rebatched,
    classifier_weights,
    depth_module_names,
    last_linear_name,
    model_params,
    next_token_labels,
    resolve_module,
    stream_features,
)
from lossatlas.probes.settings import MODES, check_choice, check_finite_number

NC1_VARIANTS: tuple[str, ...] = ("pinv", "svd", "quotient", "cdnv")
PINV_RTOL = 1e-10


# ---- NC1 ------------------------------------------------------------------------------------------
def psd_pinv(a: Tensor, *, rtol: float = PINV_RTOL, top: int | None = None) -> Tensor:
    """Pseudo-inverse of a symmetric PSD matrix by ``eigh``: eigenvalues ≤ rtol·λ_max are dropped.

    ``top`` keeps at most the ``top`` largest eigenpairs (Han et al. 2022's top-(C−1) variant).
    """
    evals, evecs = torch.linalg.eigh(a.to(torch.float64))
    lam_max = float(evals.max()) if evals.numel() else 0.0
    keep = evals > rtol * max(lam_max, 0.0)
    if top is not None:
        keep &= torch.arange(evals.numel(), device=evals.device) >= evals.numel() - top
    if lam_max <= 0.0:
        keep[:] = False
    v = evecs[:, keep]
    return (v / evals[keep]) @ v.T


def nc1(sigma_w: Tensor, sigma_b: Tensor, num_classes: int, variant: str = "pinv") -> float:
    """NC1 within-class variability: (1/C) tr(Σ_W Σ_B^†) (Papyan, Han, Donoho 2020).

    Variants: ``"pinv"`` Σ_B^† by eigh with threshold 1e-10·λ_max; ``"svd"`` Σ_B^† from the top C−1
    eigenpairs (Han et al. 2022); ``"quotient"`` tr Σ_W / tr Σ_B (Tirer et al. 2023). For CDNV use
    ``cdnv``. Closed form: Σ_W = (a²/p)I around ETF means of norm r ⇒ (a²/p)(C−1)²/(C r²).
    """
    try:
        check_choice("nc1 variant", variant, ("pinv", "svd", "quotient"))
    except ValueError as err:
        raise ValueError(f"{err} (cdnv: use cdnv())") from None
    sigma_w, sigma_b = sigma_w.to(torch.float64), sigma_b.to(torch.float64)
    if variant == "quotient":
        return float(torch.trace(sigma_w) / torch.trace(sigma_b))
    top = num_classes - 1 if variant == "svd" else None
    return float(torch.trace(sigma_w @ psd_pinv(sigma_b, top=top)) / num_classes)


def cdnv(means: Tensor, class_variances: Tensor) -> float:
    """Class-distance normalised variance, averaged over pairs c < c' (Galanti et al. 2022).

    CDNV = mean_{c<c'} (σ_c² + σ_c'²) / (2 ||μ_c − μ_c'||²), σ_c² = (1/n_c) Σ_{i∈c} ||h_i − μ_c||².
    """
    means, var = means.to(torch.float64), class_variances.to(torch.float64)
    c = means.shape[0]
    if c < 2:
        raise ValueError("CDNV needs at least two classes")
    i, j = torch.triu_indices(c, c, offset=1)
    dist2 = ((means[i] - means[j]) ** 2).sum(1)
    return float(((var[i] + var[j]) / (2 * dist2)).mean())


# ---- NC2 ------------------------------------------------------------------------------------------
def _norms(vectors: Tensor) -> Tensor:
    return vectors.to(torch.float64).norm(dim=1)


def cosine_matrix(vectors: Tensor) -> Tensor:
    """Pairwise cosines of the rows (C, C)."""
    v = vectors.to(torch.float64)
    v = v / v.norm(dim=1, keepdim=True)
    return v @ v.T


def _off_diagonal(g: Tensor) -> Tensor:
    i, j = torch.triu_indices(g.shape[0], g.shape[0], offset=1)
    return g[i, j]


def nc2_equinorm(vectors: Tensor) -> float:
    """Equinorm: coefficient of variation Std_c ||v_c|| / Avg_c ||v_c|| (population std; Papyan et al. 2020).

    Pass ``centred_means`` (μ_c − μ_G) for CV_μ or the classifier rows W for CV_W.
    """
    n = _norms(vectors)
    return float(n.std(correction=0) / n.mean())


def nc2_equiangularity(vectors: Tensor) -> float:
    """Equiangularity: population std of the pairwise cosines cos(v_c, v_c'), c ≠ c' (Papyan et al. 2020)."""
    return float(_off_diagonal(cosine_matrix(vectors)).std(correction=0))


def nc2_max_angle(vectors: Tensor) -> float:
    """Maximal-angle deviation Avg_{c≠c'} |cos(v_c, v_c') + 1/(C−1)| (Papyan et al. 2020); 0 for a simplex ETF."""
    c = vectors.shape[0]
    return float((_off_diagonal(cosine_matrix(vectors)) + 1.0 / (c - 1)).abs().mean())


def _etf_target(c: int, like: Tensor) -> Tensor:
    eye = torch.eye(c, dtype=torch.float64, device=like.device)
    return (eye - 1.0 / c) / math.sqrt(c - 1)


def nc2_etf_distance(vectors: Tensor) -> float:
    """Zhu et al. 2021 ETF distance ||VVᵀ/||VVᵀ||_F − (I − 11ᵀ/C)/√(C−1)||_F (V = W or centred means)."""
    v = vectors.to(torch.float64)
    g = v @ v.T
    return float((g / g.norm() - _etf_target(v.shape[0], v)).norm())


# ---- NC3, NC4, bias -------------------------------------------------------------------------------
def nc3_self_duality(weights: Tensor, centred_means: Tensor) -> float:
    """Papyan NC3 ||Wᵀ/||W||_F − M/||M||_F||_F² (squared Frobenius; 0 collapsed, 4 for W = −βMᵀ)."""
    w, m = weights.to(torch.float64), centred_means.to(torch.float64)
    return float(((w / w.norm() - m / m.norm()) ** 2).sum())


def nc3_zhu(weights: Tensor, centred_means: Tensor) -> float:
    """Zhu et al. 2021 W–H relation ||WM/||WM||_F − (I − 11ᵀ/C)/√(C−1)||_F, M = centred means as columns."""
    w, m = weights.to(torch.float64), centred_means.to(torch.float64)
    wm = w @ m.T  # (C, C)
    return float((wm / wm.norm() - _etf_target(w.shape[0], w)).norm())


def ncc_predict(features: Tensor, means: Tensor) -> Tensor:
    """Index of the nearest class mean argmin_c ||h_i − μ_c|| for every row (N,)."""
    return torch.cdist(features.to(torch.float64), means.to(torch.float64)).argmin(1)


def nc4_ncc_mismatch(features: Tensor, weights: Tensor, bias: Tensor | None, means: Tensor) -> float:
    """NC4: (1/N) Σ_i 1[argmax_c(w_cᵀh_i + b_c) ≠ argmin_c ||h_i − μ_c||] (rows of W and means aligned)."""
    h = features.to(torch.float64)
    logits = h @ weights.to(torch.float64).T
    if bias is not None:
        logits = logits + bias.to(torch.float64)
    return float((logits.argmax(1) != ncc_predict(h, means)).to(torch.float64).mean())


def bias_collapse(weights: Tensor, bias: Tensor, global_mean: Tensor) -> float:
    """Zhu et al. 2021 bias collapse ||Wμ_G + b||₂."""
    return float((weights.to(torch.float64) @ global_mean.to(torch.float64) + bias.to(torch.float64)).norm())


# ---- minority collapse ------------------------------------------------------------------------------
def minority_mask(counts: Tensor, threshold: float | None = None) -> Tensor:
    """Minority classes: count < ``threshold``, or count < median(counts) when None."""
    counts = counts.to(torch.float64)
    thr = float(np.median(counts.cpu().numpy())) if threshold is None else float(threshold)
    return counts < thr


def mean_pairwise_cosine(vectors: Tensor) -> float:
    """Average cosine over pairs c < c' of the rows; NaN with fewer than two rows."""
    if vectors.shape[0] < 2:
        return float("nan")
    return float(_off_diagonal(cosine_matrix(vectors)).mean())


def minority_collapse(vectors: Tensor, counts: Tensor, threshold: float | None = None) -> dict[str, float]:
    """Minority-collapse view (Fang, He, Long, Su 2021): mean pairwise cosine among minority vs majority rows.

    ``vectors``: classifier rows W or centred means (C, p); minority per ``minority_mask``. Under
    minority collapse the minority rows align (cosine → 1) while majority rows stay spread.
    """
    mask = minority_mask(counts, threshold).to(vectors.device)
    return {
        "minority": mean_pairwise_cosine(vectors[mask]),
        "majority": mean_pairwise_cosine(vectors[~mask]),
    }


def mean_cosine_to_others(vectors: Tensor) -> Tensor:
    """For each row, the mean cosine with the other rows (C,): the per-class angle view."""
    g = cosine_matrix(vectors)
    c = g.shape[0]
    return (g.sum(1) - g.diagonal()) / (c - 1)


# ---- across every linear layer (Dang et al. 2023) --------------------------------------------------------
def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` in ``named_modules`` order."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to measure across layers")
    return names


def downstream_products(model: torch.nn.Module, names: list[str], params) -> dict[str, Tensor | None]:
    """P_m = W_M⋯W_m for each Linear ``names[m]`` (M = the last), float64; None where shapes do not chain.

    Exact end-to-end maps of a bias-free deep linear net; for other nets, a linearisation that ignores
    biases and whatever sits between the layers.
    """
    out: dict[str, Tensor | None] = {}
    prod: Tensor | None = None
    for i, n in enumerate(reversed(names)):
        w, _ = classifier_weights(model, n, params)
        if i == 0:
            prod = w
        elif prod is not None and prod.shape[1] == w.shape[0]:
            prod = prod @ w.to(prod.device)
        else:
            prod = None
        out[n] = prod
    return out


def orthogonal_frame_distance(vectors: Tensor) -> float:
    """Orthogonal-frame distance ||VVᵀ/||VVᵀ||_F − I_C/√C||_F of the rows (Dang et al. 2023; 0 when orthogonal, equal norm)."""
    v = vectors.to(torch.float64)
    g = v @ v.T
    eye = torch.eye(v.shape[0], dtype=torch.float64, device=v.device)
    return float((g / g.norm() - eye / math.sqrt(v.shape[0])).norm())


def per_layer_collapse(model, names: list[str], stats: dict, labels: Tensor, params) -> dict[str, np.ndarray]:
    """NC2/NC3 at the input of every Linear in ``names`` (finished ``ClassStatistics`` per name).

    NC3 compares the rows of P_m = W_M⋯W_m (present classes) with the class means at the input of layer m.
    """
    products = downstream_products(model, names, params)
    keys = ("layer_nc2_equinorm_means", "layer_nc2_equiangular_means", "layer_nc2_etf_means", "layer_of_means",
            "layer_nc2_equinorm_weights", "layer_nc3_self_duality", "layer_nc3_uncentred")
    out = {k: np.full(len(names), np.nan) for k in keys}
    for i, n in enumerate(names):
        means = stats[n].means
        centred = means - stats[n].global_mean
        out["layer_nc2_equinorm_means"][i] = nc2_equinorm(centred)
        out["layer_nc2_equiangular_means"][i] = nc2_equiangularity(centred)
        out["layer_nc2_etf_means"][i] = nc2_etf_distance(centred)
        out["layer_of_means"][i] = orthogonal_frame_distance(means)
        prod = products[n]
        if prod is None or prod.shape[1] != means.shape[1] or prod.shape[0] <= int(labels.max()):
            continue  # the product does not map these features to the classes
        w = prod.to(means.device)[labels]
        out["layer_nc2_equinorm_weights"][i] = nc2_equinorm(w)
        out["layer_nc3_self_duality"][i] = nc3_self_duality(w, centred)
        out["layer_nc3_uncentred"][i] = nc3_self_duality(w, means)
    return out


# ---- the probe ----------------------------------------------------------------------------------------
def nc1_from_statistics(stats: ClassStatistics, variant: str) -> float:
    """NC1 of a finished ``ClassStatistics`` in the given variant (pinv, svd, quotient, cdnv)."""
    if variant == "cdnv":
        return cdnv(stats.means, stats.class_variances)
    return nc1(stats.sigma_w, stats.sigma_b, int(stats.present.sum()), variant)


@register_probe
@dataclass(frozen=True, kw_only=True)
class NeuralCollapse(Probe):
    """Neural collapse NC1–NC4 of the penultimate features and classifier (Papyan, Han, Donoho 2020).

    Settings: ``module`` whose input holds the features (None: the last nn.Linear, whose W and b
    are the classifier); ``layers``: None, ``"depth"`` (inputs of every Linear/Conv) or module names
    for NC1 and NCC accuracy per layer, or ``"all"`` (inputs of every nn.Linear) which adds NC2 and NC3 per
    layer against the product of that layer's and every later Linear's weights (Dang et al. 2023, ICML,
    "Neural Collapse in Deep Linear Networks: From Balanced to Imbalanced Data"); ``nc1_variant`` (pinv, svd, quotient, cdnv) for ``nc1`` and
    the per-layer NC1; ``max_examples``/``batch_size`` for the stream; ``mode`` the train/eval flag;
    ``minority_threshold``: classes with fewer examples are "minority" (None: below the median).
    """

    name: ClassVar[str] = "collapse"
    summary: ClassVar[str] = "neural collapse NC1-NC4, per class, per layer, minority collapse"
    section: ClassVar[str] = "representations"
    figure: ClassVar[str | None] = "collapse"
    module: str | None = None
    layers: str | tuple[str, ...] | None = None
    nc1_variant: str = "pinv"
    max_examples: int | None = None
    batch_size: int | None = None
    mode: str = "eval"
    minority_threshold: float | None = None

    def validate(self) -> None:
        """ValueError for a setting out of range.

        Refuses an unknown ``nc1_variant`` or ``mode``, a ``max_examples``/``batch_size`` that is not a positive
        integer, a ``layers`` tuple holding non-strings, and a ``minority_threshold`` that is not finite and > 0.
        """
        check_choice("nc1_variant", self.nc1_variant, NC1_VARIANTS)
        check_choice("mode", self.mode, MODES)
        for key in ("max_examples", "batch_size"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{key} must be a positive integer or None, got {value!r}")
        if isinstance(self.layers, (list, tuple)) and not all(isinstance(n, str) for n in self.layers):
            raise ValueError(f"layers must be None, 'depth', 'all' or a tuple of module names, got {self.layers!r}")
        check_finite_number("minority_threshold", self.minority_threshold, minimum=0.0, strict=True, optional=True)

    def _layer_names(self, model) -> list[str]:
        if self.layers is None:
            return []
        if self.layers == "depth":
            return depth_module_names(model)
        if self.layers == "all":
            return linear_module_names(model)
        names = [self.layers] if isinstance(self.layers, str) else list(self.layers)
        return [resolve_module(model, n)[0] for n in names]

    def run(self, ctx: ProbeContext) -> Result:
        """NC1–NC4 from two float64 passes over the data (class means, then scatter and NCC predictions).

        Scalars: ``nc1`` (the chosen variant) and ``nc1_pinv|svd|quotient|cdnv``, e.g. (1/C) tr(Σ_W Σ_B^†);
        ``nc2_*_means`` (equinorm, equiangular, max-angle, ETF distance of μ_c − μ_G); ``ncc_accuracy``.
        When the last Linear acts on the features: ``nc2_*_weights`` of W, ``nc3_self_duality``, ``nc3_zhu``,
        ``nc4_ncc_mismatch`` (NCC vs classifier disagreement), ``classifier_accuracy``, ``bias_collapse``
        ||Wμ_G + b||. Per class: counts, mean and weight norms/cosines, variances, NCC accuracy, minority flag;
        minority/majority mean cosines when both groups have ≥ 2 classes. With ``layers``: ``layer_nc1``,
        ``layer_ncc_accuracy``, ``layer_width``; with ``layers="all"`` also ``layer_nc2_equinorm_means``,
        ``layer_nc2_equiangular_means``, ``layer_nc2_etf_means`` (centred means), ``layer_of_means``
        ||H̄H̄ᵀ/||·||_F − I/√C||_F (uncentred), and against P_m = W_M⋯W_m (this and every later Linear,
        biases ignored; NaN where the shapes do not chain) ``layer_nc3_self_duality`` (centred),
        ``layer_nc3_uncentred`` ||P_m/||P_m|| − H̄/||H̄||||_F² and ``layer_nc2_equinorm_weights`` of P_m.
        ValueError when the data holds fewer than two classes.
        """
        start = time.perf_counter()
        model = ctx.model
        feature_name, _ = resolve_module(model, self.module)
        layer_names = self._layer_names(model)
        names = list(dict.fromkeys([feature_name, *layer_names]))  # one forward for all, deduplicated
        params = model_params(model, ctx.device, ctx.dtype)
        data = Rebatched(ctx.data, self.batch_size, self.max_examples, ctx.device, ctx.dtype)
        w_full, b_full = classifier_weights(model, last_linear_name(model), params)

        stats = {n: ClassStatistics() for n in names}
        next_token = next_token_labels(model, ctx.loss)  # a causal LM's token t has the class of token t + 1
        for feats, y in stream_features(model, data, names, mode=self.mode, params=params, next_token=next_token):
            for n in names:
                stats[n].update_means(feats[n], y)
        head = stats[feature_name]
        p = head.global_mean.shape[0]
        use_classifier = w_full.shape[1] == p and w_full.shape[0] >= head.counts.shape[0]
        w_full, b_full = w_full.to(head.global_mean.device), None if b_full is None else b_full.to(head.global_mean.device)
        for feats, y in stream_features(model, data, names, mode=self.mode, params=params, next_token=next_token):
            for n in names:
                logits = None
                if n == feature_name and use_classifier:
                    logits = feats[n] @ w_full.T + (0.0 if b_full is None else b_full)
                stats[n].update_scatter(feats[n], y, logits)

        present = head.present
        labels = torch.nonzero(present).squeeze(1)
        c = int(labels.numel())
        if c < 2:
            raise ValueError(f"the data holds {c} class(es); neural collapse needs at least two")
        counts = head.counts[present]
        means = head.means
        centred = means - head.global_mean
        res = self.new_result(ctx.step)

        def scalar(key: str, v: float) -> None:
            res.add(key, np.float64(v))

        def per_class(key: str, v: Tensor) -> None:
            res.add(key, v.detach().cpu().numpy(), ("class",))

        sw, sb = head.sigma_w, head.sigma_b
        scalar("nc1", nc1_from_statistics(head, self.nc1_variant))
        for variant in ("pinv", "svd", "quotient"):
            scalar(f"nc1_{variant}", nc1(sw, sb, c, variant))
        scalar("nc1_cdnv", cdnv(means, head.class_variances))
        scalar("nc2_equinorm_means", nc2_equinorm(centred))
        scalar("nc2_equiangular_means", nc2_equiangularity(centred))
        scalar("nc2_max_angle_means", nc2_max_angle(centred))
        scalar("nc2_etf_means", nc2_etf_distance(centred))
        scalar("ncc_accuracy", head.ncc_accuracy)
        per_class("class_count", counts)
        per_class("class_mean_norm", centred.norm(dim=1))
        per_class("class_variance", head.class_variances)
        per_class("class_ncc_accuracy", head.ncc_correct_per_class[present] / counts)
        per_class("class_mean_cosine", mean_cosine_to_others(centred))
        mask = minority_mask(counts, self.minority_threshold)
        per_class("class_is_minority", mask)
        n_min, n_maj = int(mask.sum()), int((~mask).sum())
        minority_view = n_min >= 2 and n_maj >= 2
        if minority_view:
            view = minority_collapse(centred, counts, self.minority_threshold)
            scalar("minority_mean_cosine", view["minority"])
            scalar("majority_mean_cosine", view["majority"])
        if use_classifier:
            w = w_full[labels]
            b = None if b_full is None else b_full[labels]
            scalar("nc2_equinorm_weights", nc2_equinorm(w))
            scalar("nc2_equiangular_weights", nc2_equiangularity(w))
            scalar("nc2_max_angle_weights", nc2_max_angle(w))
            scalar("nc2_etf_weights", nc2_etf_distance(w))
            scalar("nc3_self_duality", nc3_self_duality(w, centred))
            scalar("nc3_zhu", nc3_zhu(w, centred))
            scalar("nc4_ncc_mismatch", head.ncc_mismatch_rate)
            scalar("classifier_accuracy", head.classifier_correct / head.total)
            if b is not None:
                scalar("bias_collapse", bias_collapse(w, b, head.global_mean))
            per_class("class_weight_norm", w.norm(dim=1))
            per_class("class_weight_cosine", mean_cosine_to_others(w))
            if minority_view:
                view = minority_collapse(w, counts, self.minority_threshold)
                scalar("minority_weight_cosine", view["minority"])
                scalar("majority_weight_cosine", view["majority"])

        res.add_coord("class", labels.cpu().numpy().astype(np.int64))
        if layer_names:
            layer = {"layer": np.array(layer_names, dtype=str)}
            res.add("layer_nc1", np.array([nc1_from_statistics(stats[n], self.nc1_variant) for n in layer_names]),
                    ("layer",), layer)
            res.add("layer_ncc_accuracy", np.array([stats[n].ncc_accuracy for n in layer_names]), ("layer",), layer)
            res.add("layer_width", np.array([stats[n].global_mean.shape[0] for n in layer_names], dtype=np.int64),
                    ("layer",), layer)
            if self.layers == "all":
                for key, values in per_layer_collapse(model, layer_names, stats, labels, params).items():
                    res.add(key, values, ("layer",), layer)

        notes = []
        if p < c - 1:
            notes.append(f"feature width {p} < C-1 = {c - 1}: a simplex ETF cannot form")
        if not use_classifier:
            notes.append(f"classifier {last_linear_name(model)!r} does not act on {feature_name!r}: W metrics skipped")
        if not minority_view:
            notes.append("minority view skipped: needs at least two minority and two majority classes")
        res.meta.update({
            "num_classes": c,
            "num_examples": head.total,
            "counts": [int(v) for v in counts.tolist()],
            "feature_module": feature_name,
            "classifier_module": last_linear_name(model),
            "feature_width": p,
            "global_mean": "sample-weighted",
            "nc1_pinv_rtol": PINV_RTOL,
            "std": "population (ddof=0)",
            "mode": self.mode,
            "dtype": "float64 accumulation",
            "notes": notes,
            "elapsed_s": time.perf_counter() - start,
        })
        return res
