"""Massive activations in the residual stream and attention-sink heads, per layer and head.

Sun, Chen, Kolter, Liu 2024 (COLM), "Massive Activations in Large Language Models": a few feature dimensions of
the residual stream (hidden states) take values orders of magnitude above the rest. Criterion per layer ℓ with
hidden states h ∈ R^{B×T×d}: an entry is massive when

    |h_{b,t,j}| ≥ ratio · median_{b,t,j}|h|   and   |h_{b,t,j}| ≥ min_value,

defaults ratio = 100 and min_value = 100 (the paper's "magnitude above 100 and about 1000× the median"
uses these orders). Xiao, Tian, Chen, Han, Lewis 2024 (ICLR), "Efficient Streaming Language Models with
Attention Sinks": heads that put most attention mass on the first token. Sink mass of head (ℓ, h):

    s_{ℓ,h} = mean over batch and queries t ≥ 1 of A_{ℓ,h}[t, 0],

(query 0 is left out: causally it can only attend to itself); a head is a sink head when s > ``sink_threshold``
(default 0.5).

Our GPT (``lossatlas.models.gpt``): hidden states are the outputs of every ``blocks.<i>``; attention weights are
softmax(causal mask(logits)) of the logits seen by ``blocks.<i>.attn.logits_hook``. Hugging Face models (dict
batches): ``output_hidden_states=True`` (``hidden_states[1:]``, one per layer; GPT-2's last one is after the
final LayerNorm) and ``output_attentions=True`` (needs eager attention).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from lossatlas.probes.base import Probe, ProbeContext, Result
from lossatlas.probes.settings import check_finite_number


def massive_mask(hidden: Tensor, ratio: float = 100.0, min_value: float = 100.0) -> tuple[Tensor, float]:
    """Boolean mask of massive entries of one layer's hidden states and the layer's median |h|.

    Massive: |h| ≥ ratio · median|h| and |h| ≥ min_value (Sun et al. 2024).
    """
    a = hidden.detach().abs().to(torch.float64)
    median = float(a.flatten().median())
    return (a >= ratio * median) & (a >= min_value), median


def sink_mass(attn: Tensor) -> Tensor:
    """Mean attention mass on key 0 over batch and queries t ≥ 1, per head: (B, H, T, T) → (H,)."""
    if attn.shape[-2] < 2:
        raise ValueError("sink mass needs sequences of at least two tokens")
    return attn.detach().to(torch.float64)[:, :, 1:, 0].mean(dim=(0, 2))


def _is_gpt(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    return isinstance(blocks, nn.ModuleList) and all(hasattr(b, "attn") and hasattr(b.attn, "logits_hook")
                                                      for b in blocks)


def gpt_states(model: nn.Module, idx: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Hidden states (outputs of every block) and attention weights (B, H, T, T) per layer of our GPT."""
    hidden: list[Tensor] = []
    attn: list[Tensor] = []

    def on_block(_m, _inp, out):
        hidden.append(out.detach())

    def on_logits(_m, _inp, out):
        t = out.shape[-1]
        mask = torch.ones(t, t, dtype=torch.bool, device=out.device).tril()
        attn.append(torch.softmax(out.detach().masked_fill(~mask, float("-inf")), dim=-1))

    handles = []
    for block in model.blocks:
        handles.append(block.register_forward_hook(on_block))
        handles.append(block.attn.logits_hook.register_forward_hook(on_logits))
    try:
        model(idx)
    finally:
        for h in handles:
            h.remove()
    return hidden, attn


def hf_states(model: nn.Module, inputs: Mapping) -> tuple[list[Tensor], list[Tensor]]:
    """Hidden states (``hidden_states[1:]``) and attentions of a Hugging Face model."""
    out = model(**inputs, output_hidden_states=True, output_attentions=True)
    hidden = [h.detach() for h in out.hidden_states[1:]]
    attentions = getattr(out, "attentions", None)
    if not attentions or any(a is None for a in attentions):
        raise ValueError("the model returned no attention weights; load it with attn_implementation='eager'")
    return hidden, [a.detach() for a in attentions]


@dataclass(frozen=True, kw_only=True)  # not in the registry yet: it needs a GPT or a Hugging Face model
class MassiveActivations(Probe):
    """Massive activations (Sun et al. 2024) and attention-sink heads (Xiao et al. 2024), per layer and head.

    Settings: ``ratio`` (100) and ``min_value`` (100): an entry is massive when |h| ≥ ratio·median|h| of its
    layer and |h| ≥ min_value; ``sink_threshold`` (0.5): a head is a sink when its mean attention mass on the
    first token (queries t ≥ 1) exceeds it; ``max_batches`` (None: all) limits the batches read.
    """

    name: ClassVar[str] = "massive_activations"
    summary: ClassVar[str] = "massive residual-stream activations and attention-sink heads per layer/head"
    section: ClassVar[str] = "representations"
    ratio: float = 100.0
    min_value: float = 100.0
    sink_threshold: float = 0.5
    max_batches: int | None = None

    def validate(self) -> None:
        """ValueError for a setting out of range.

        Refuses a ratio or min_value that is not finite and ≥ 0, a sink_threshold outside [0, 1] and a
        max_batches that is not a positive integer.
        """
        check_finite_number("ratio", self.ratio, minimum=0.0)
        check_finite_number("min_value", self.min_value, minimum=0.0)
        check_finite_number("sink_threshold", self.sink_threshold, minimum=0.0)
        if self.sink_threshold > 1.0:
            raise ValueError(f"sink_threshold must be in [0, 1], got {self.sink_threshold!r}")
        if self.max_batches is not None and (not isinstance(self.max_batches, int) or self.max_batches <= 0):
            raise ValueError(f"max_batches must be a positive integer or None, got {self.max_batches!r}")

    def run(self, ctx: ProbeContext) -> Result:
        """Massive entries and sink mass from one forward per batch (hooks on our GPT, HF outputs otherwise).

        Per layer: ``layer_max_abs``, ``layer_median_abs``, ``layer_max_ratio`` (max|h|/median|h|),
        ``layer_num_massive`` entries, ``layer_first_token_share`` (share of massive entries at token 0) and
        ``massive_dims`` (layer, feature) bool; per layer and head: ``sink_mass``, ``sink_heads`` (bool). Scalars:
        ``num_massive_layers``, ``num_sink_heads``, ``max_ratio``. Medians and maxima are over every batch read.
        """
        start = time.perf_counter()
        model = ctx.model
        was_training = model.training
        model.eval()
        layers: list[list[Tensor]] = []
        masses: list[list[Tensor]] = []
        try:
            with torch.no_grad():
                for i, (inputs, _targets) in enumerate(ctx.data):
                    if self.max_batches is not None and i >= self.max_batches:
                        break
                    if isinstance(inputs, Mapping):
                        hidden, attn = hf_states(model, inputs)
                    elif _is_gpt(model):
                        hidden, attn = gpt_states(model, inputs)
                    else:
                        raise ValueError(f"{type(model).__name__} is neither lossatlas's GPT nor a Hugging Face "
                                         "model fed dict batches; massive_activations needs one of them")
                    if not layers:
                        layers, masses = [[] for _ in hidden], [[] for _ in attn]
                    for store, h in zip(layers, hidden):
                        store.append(h.reshape(-1, h.shape[-1]).to(torch.float64).cpu())
                    for store, a in zip(masses, attn):
                        store.append(a.to(torch.float64).cpu()[:, :, 1:, 0])
                    seq_len = hidden[0].shape[-2]
        finally:
            model.train(was_training)
        if not layers:
            raise ValueError("massive_activations read no batch; give at least one")
        res = self.new_result(ctx.step)
        n_layers, width = len(layers), layers[0][0].shape[-1]
        dims = np.zeros((n_layers, width), dtype=bool)
        stats = {k: np.zeros(n_layers) for k in ("max_abs", "median_abs", "max_ratio", "first_token_share")}
        counts = np.zeros(n_layers, dtype=np.int64)
        for li, chunks in enumerate(layers):
            h = torch.cat(chunks)  # (B·T, d), rows token-major within each sequence
            mask, median = massive_mask(h, self.ratio, self.min_value)
            top = float(h.abs().max())
            stats["max_abs"][li], stats["median_abs"][li] = top, median
            stats["max_ratio"][li] = top / median if median > 0 else math.inf
            counts[li] = int(mask.sum())
            dims[li] = mask.any(0).numpy()
            first = mask.reshape(-1, seq_len, width)[:, 0].sum()  # massive entries at token 0
            stats["first_token_share"][li] = float(first) / counts[li] if counts[li] else 0.0
        mass = np.stack([torch.cat(c).mean(dim=(0, 2)).numpy() for c in masses]) if masses else np.zeros((0, 0))
        layer = {"layer": np.arange(n_layers)}
        for k, v in stats.items():
            res.add(f"layer_{k}", v, ("layer",), layer)
        res.add("layer_num_massive", counts, ("layer",), layer)
        res.add("massive_dims", dims, ("layer", "feature"), {**layer, "feature": np.arange(width)})
        if mass.size:
            coords = {"attn_layer": np.arange(mass.shape[0]), "head": np.arange(mass.shape[1])}
            res.add("sink_mass", mass, ("attn_layer", "head"), coords)
            res.add("sink_heads", mass > self.sink_threshold, ("attn_layer", "head"), coords)
        res.add("num_massive_layers", np.int64((counts > 0).sum()))
        res.add("num_sink_heads", np.int64((mass > self.sink_threshold).sum()))
        res.add("max_ratio", np.float64(stats["max_ratio"].max()))
        res.meta.update({"criterion": f"|h| >= {self.ratio} x median|h| and |h| >= {self.min_value}",
                         "sink": f"mean attention on token 0 over queries t >= 1 > {self.sink_threshold}",
                         "sequence_length": int(seq_len), "elapsed_s": time.perf_counter() - start})
        return res
