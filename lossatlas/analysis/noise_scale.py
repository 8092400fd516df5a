"""Gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish, Kaplan, Amodei et al. 2018).

The paper is "An empirical model of large-batch training", arXiv 1812.06162.

G is the true (data-set mean) gradient and Σ the per-example gradient covariance, so that
E|G_B|² = |G|² + tr(Σ)/B for a batch mean gradient G_B. Two estimators:

- from per-example gradients (``noise_scale_per_example``, ``gradient_noise_scale`` computing them
  with ``torch.func``): tr Σ̂ = Σ_i |g_i − ḡ|²/(N − 1), |G|² ≈ |ḡ|² − tr Σ̂/N (both unbiased);
- from squared norms of small- and large-batch gradients (``noise_scale_from_norms``, the paper's
  appendix A.1): |G|² ≈ (B_big|G_big|² − B_small|G_small|²)/(B_big − B_small),
  tr Σ ≈ (|G_small|² − |G_big|²)/(1/B_small − 1/B_big), and B_simple = mean(tr Σ)/mean(|G|²) —
  the ratio of averages, never the average of per-step ratios (single estimates can be negative).

Pitfalls: measure before clipping; for language models an "example" here is one
sequence (the per-example loss averages its tokens); Adam's preconditioning is not included.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from lossatlas.batches import as_batches, batch_length, map_inputs
from lossatlas.losses import batch_loss, check_loss_name, require_output_loss
from lossatlas.outputs import model_outputs


@dataclass(frozen=True)
class NoiseScale:
    """A gradient-noise-scale estimate: B_simple = trace_sigma / grad_sq from ``n`` measurements."""

    b_simple: float
    grad_sq: float
    trace_sigma: float
    n: int

    def to_dict(self) -> dict:
        """A JSON-able dict."""
        return asdict(self)


def two_batch_estimates(sq_norm_small: Any, sq_norm_big: Any, b_small: int, b_big: int) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased per-measurement (|G|², tr Σ) from |G_Bsmall|² and |G_Bbig|² (McCandlish et al. 2018, App. A.1).

    |G|² = (B_big|G_big|² − B_small|G_small|²)/(B_big − B_small),
    tr Σ = (|G_small|² − |G_big|²)/(1/B_small − 1/B_big).
    """
    if not (isinstance(b_small, (int, np.integer)) and isinstance(b_big, (int, np.integer)) and 0 < b_small < b_big):
        raise ValueError(f"need integer batch sizes with 0 < b_small < b_big, got b_small={b_small!r}, b_big={b_big!r}")
    s = np.asarray(sq_norm_small, dtype=np.float64)
    b = np.asarray(sq_norm_big, dtype=np.float64)
    if s.shape != b.shape:
        raise ValueError(f"sq_norm_small and sq_norm_big must have the same shape, got {s.shape} and {b.shape}")
    g2 = (b_big * b - b_small * s) / (b_big - b_small)
    tr = (s - b) / (1.0 / b_small - 1.0 / b_big)
    return g2, tr


def noise_scale_from_norms(sq_norm_small: Any, sq_norm_big: Any, b_small: int, b_big: int, *,
                           ema: float | None = None) -> NoiseScale:
    """B_simple from paired squared norms of small- and big-batch gradients.

    Args:
        sq_norm_small: |G_Bsmall|² per measurement.
        sq_norm_big: |G_Bbig|² per measurement (as many as ``sq_norm_small``).
        b_small: the small batch size (e.g. the per-device batch).
        b_big: the big batch size (e.g. the global batch).
        ema: None averages all measurements; α in (0, 1) uses the debiased exponential moving
            averages of |G|² and tr Σ with that decay (their last values), as in training loops.
    """
    g2, tr = two_batch_estimates(sq_norm_small, sq_norm_big, b_small, b_big)
    g2, tr = g2.ravel(), tr.ravel()
    if g2.size == 0:
        raise ValueError("need at least one pair of gradient norms")
    if ema is None:
        mg, mt = float(g2.mean()), float(tr.mean())
    else:
        if not 0.0 < ema < 1.0:
            raise ValueError(f"ema must lie in (0, 1) (e.g. 0.95), got {ema!r}")
        mg = mt = 0.0
        for a, b in zip(g2, tr):
            mg, mt = ema * mg + (1 - ema) * a, ema * mt + (1 - ema) * b
        debias = 1 - ema ** g2.size
        mg, mt = mg / debias, mt / debias
    return NoiseScale(b_simple=mt / mg if mg != 0 else float("inf"), grad_sq=mg, trace_sigma=mt, n=int(g2.size))


def noise_scale_per_example(per_example_grads: Any) -> NoiseScale:
    """B_simple from per-example gradients g_i (rows of an (N, P) array).

    tr Σ̂ = Σ_i |g_i − ḡ|²/(N − 1) and |G|² ≈ |ḡ|² − tr Σ̂/N, both unbiased.
    """
    g = np.asarray(per_example_grads, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] < 2:
        raise ValueError(f"need per-example gradients as an (N, P) array with at least 2 examples, got shape {g.shape}")
    n = g.shape[0]
    mean = g.mean(axis=0)
    return _from_sums(float((g**2).sum()), mean * n, n)


def _from_sums(sum_sq: float, sum_g: np.ndarray, n: int) -> NoiseScale:
    mean_sq = float(sum_g @ sum_g) / n**2
    tr = (sum_sq - n * mean_sq) / (n - 1)
    g2 = mean_sq - tr / n
    return NoiseScale(b_simple=tr / g2 if g2 != 0 else float("inf"), grad_sq=g2, trace_sigma=tr, n=n)


def gradient_noise_scale(model: nn.Module, data: Any, loss: str = "cross_entropy", *,
                         params: Mapping[str, Tensor] | None = None, max_examples: int | None = None,
                         chunk_size: int | None = 256) -> NoiseScale:
    """B_simple of ``model`` on ``data`` from per-example gradients (torch.func ``vmap(grad)``).

    Each example's loss is ``batch_loss(loss, f(x_i), y_i)`` (a sequence's mean token loss for a
    language model). The model runs in its current train/eval mode and is never modified; use
    ``params`` to evaluate at another point. Per-example gradients are formed ``chunk_size`` at a
    time and reduced to running sums (memory: chunk_size × #params). Inputs may be tensors or dict
    batches (``model(**x)``; the output is taken by ``lossatlas.outputs.model_outputs``). The loss
    "model" is refused: its scalar has no per-example terms to vmap over.

    Args:
        model: the network.
        data: (inputs, targets) batches, anything ``lossatlas.batches.as_batches`` accepts.
        loss: a name from ``lossatlas.losses.LOSSES``.
        params: parameters to evaluate at (default: the model's trainable parameters).
        max_examples: stop after this many examples.
        chunk_size: examples per vmap call (None: a whole batch at once).
    """
    check_loss_name(loss)
    require_output_loss(loss, "the gradient noise scale (per-example gradients)")
    if params is None:
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    else:
        params = {n: p.detach() for n, p in params.items()}
    names = list(params)

    def example_loss(theta: dict[str, Tensor], x: Tensor | dict[str, Tensor], y: Tensor) -> Tensor:
        out = model_outputs(model, map_inputs(lambda t: t.unsqueeze(0), x), params=theta)
        return batch_loss(loss, out, y.unsqueeze(0))

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
    sum_sq = 0.0
    sum_g: Tensor | None = None
    n = 0
    for x, y in as_batches(data, None):
        if max_examples is not None:
            x, y = map_inputs(lambda t, k=max_examples - n: t[:k], x), y[: max_examples - n]
        size = batch_length(x)
        step = chunk_size or size
        for i in range(0, size, step):
            g = per_example(params, map_inputs(lambda t, i=i, s=step: t[i:i + s], x), y[i:i + step])
            flat = torch.cat([g[k].reshape(g[k].shape[0], -1) for k in names], dim=1).double()  # (b, P)
            sum_sq += float((flat**2).sum())
            s = flat.sum(0)
            sum_g = s if sum_g is None else sum_g + s
            n += flat.shape[0]
        if max_examples is not None and n >= max_examples:
            break
    if n < 2 or sum_g is None:
        raise ValueError(f"need at least 2 examples for a noise scale, got {n}; pass more data")
    return _from_sums(sum_sq, sum_g.cpu().numpy(), n)


def noise_scale_from_log(small: Sequence[float], big: Sequence[float], b_small: int, b_big: int) -> NoiseScale:
    """Alias of ``noise_scale_from_norms`` for logged per-step |G_small|², |G_big|² columns (NaN rows dropped)."""
    s, b = np.asarray(small, dtype=np.float64), np.asarray(big, dtype=np.float64)
    keep = np.isfinite(s) & np.isfinite(b)
    return noise_scale_from_norms(s[keep], b[keep], b_small, b_big)
