"""Massive activations in the residual stream and attention-sink heads, per layer and head.

Sun, Chen, Kolter, Liu 2024 (COLM), "Massive Activations in Large Language Models": a few feature dimensions of
the residual stream (the hidden state after each transformer layer) take values orders of magnitude above the
rest, mostly at the first token. Their criterion: "activations with magnitudes greater than 100 and about 1,000
times larger than the median magnitude of their hidden states". Here, per layer ℓ with hidden states
h ∈ R^{N×T×d} over every sequence read (padded positions left out), an entry is massive when

    |h_{n,t,j}| > min_value   and   |h_{n,t,j}| ≥ ratio · median|h|,

the median over every non-padded entry of that layer (the mean of the two middle values for an even count);
defaults min_value = 100 and ratio = 1000 (the paper's numbers). A feature dimension j is massive in layer ℓ when
at least one of its entries is. Per layer the ``top_k`` largest |h| (default 3, as the paper's figures), with their
(sequence, token, dimension) positions and their ratio to the median, are stored too.

Xiao, Tian, Chen, Han, Lewis 2024 (ICLR), "Efficient Streaming Language Models with Attention Sinks": heads that put
most of their attention on the first token. The sink mass of head (ℓ, h) is

    s_{ℓ,h} = mean over sequences n and queries t > f_n of A_{ℓ,h}[n, t, f_n],

f_n the first non-padded position of sequence n (0 without padding), over non-padded queries; query f_n itself is
left out (causally it can only attend to itself). Head (ℓ, h) is a sink head when s_{ℓ,h} > ``sink_threshold``
(default 0.5: more than half of the attention on one token of the whole context).

Our GPT (``lossatlas.models.gpt``): the hidden states are the outputs of every ``blocks.<i>`` (forward hooks);
the attention weights are softmax(causal mask(z)) of the logits z seen by ``blocks.<i>.attn.logits_hook``.
Hugging Face models (dict batches): one forward with ``output_attentions=True`` under eager attention (the
model's own implementation is switched back afterwards) and ``output_hidden_states=True``; the hidden states
are the outputs of the decoder layers (forward hooks on the model's layer list, checked against
``hidden_states[1:-1]``), because ``hidden_states[-1]`` of GPT-2 and Llama is taken after the final norm (that
list is used instead when no layer list is found).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from lossatlas.probes.base import Probe, ProbeContext, Result, register_probe
from lossatlas.probes.settings import check_finite_number

RATIO = 1000.0  # Sun et al. 2024: about 1,000 times the median magnitude
MIN_VALUE = 100.0  # Sun et al. 2024: magnitude greater than 100
SINK_THRESHOLD = 0.5  # a head with more than half of its attention on the first token


def massive_mask(hidden: Tensor, ratio: float = RATIO, min_value: float = MIN_VALUE,
                 valid: Tensor | None = None) -> tuple[Tensor, float]:
    """Boolean mask of the massive entries of one layer's hidden states (..., T, d), and the layer's median |h|.

    Massive: |h| > min_value and |h| ≥ ratio · median|h| (Sun et al. 2024), the median over the entries of the
    positions where ``valid`` (..., T) is True (all by default); entries at other positions are never massive.
    """
    a = hidden.detach().abs().to(torch.float64)
    keep = torch.ones(a.shape[:-1], dtype=torch.bool) if valid is None else valid.to(torch.bool).cpu()
    a = a.cpu()
    median = float(np.median(a[keep].numpy())) if keep.any() else math.nan
    return torch.from_numpy(is_massive(a.numpy(), median, ratio, min_value)) & keep[..., None], median


def is_massive(magnitude: np.ndarray, median: float, ratio: float, min_value: float) -> np.ndarray:
    """The criterion of Sun et al. 2024 on magnitudes |h|: |h| > min_value and |h| ≥ ratio · median."""
    return (magnitude > min_value) & (magnitude >= ratio * median)


def sink_mass(attn: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean attention on each sequence's first token over sequences and later queries, per head: (B, H, T, T) → (H,).

    ``valid`` (B, T) marks the non-padded positions (all by default): the first token of sequence n is its first
    valid position f_n and the queries are its valid positions t > f_n.
    """
    sums, count = _sink_sums(attn.detach().to(torch.float64).cpu(), valid)
    if count == 0:
        raise ValueError("sink mass needs sequences of at least two tokens")
    return sums / count


def _sink_sums(attn: Tensor, valid: Tensor | None) -> tuple[Tensor, int]:
    """(Σ over sequences and queries of A[n, h, t, f_n] per head, number of queries) of one batch."""
    B, H, T, _ = attn.shape
    keep = torch.ones(B, T, dtype=torch.bool) if valid is None else valid.to(torch.bool).cpu()
    first = keep.to(torch.int8).argmax(dim=1)  # f_n: the first valid position (0 for a sequence without any)
    queries = keep & (torch.arange(T)[None, :] > first[:, None])  # (B, T) the valid queries after f_n
    on_first = attn.gather(-1, first.view(B, 1, 1, 1).expand(B, H, T, 1)).squeeze(-1)  # (B, H, T) A[n, h, t, f_n]
    return (on_first * queries[:, None, :]).sum(dim=(0, 2)), int(queries.sum())


def _is_gpt(model: nn.Module) -> bool:
    """Whether ``model`` is lossatlas's GPT: a ``blocks`` list whose attention modules have a ``logits_hook``."""
    blocks = getattr(model, "blocks", None)
    return isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and all(
        hasattr(b, "attn") and hasattr(b.attn, "logits_hook") for b in blocks)


def gpt_states(model: nn.Module, idx: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Hidden states (outputs of every block) and attention weights (B, H, T, T) per layer of our GPT."""
    hidden: list[Tensor] = []
    attn: list[Tensor] = []

    def on_block(_m, _inp, out):
        hidden.append(out.detach())

    def on_logits(_m, _inp, out):
        t = out.shape[-1]
        mask = torch.ones(t, t, dtype=torch.bool, device=out.device).tril()  # the causal mask the model applies
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


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Hugging Face ``model`` with eager attention inside the block (SDPA/flash return no weights), then as it was."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    if before in (None, "eager") or setter is None:  # already eager, or a transformers without the switch
        yield
        return
    setter("eager")
    try:
        yield
    finally:
        setter(before)


def _layer_list(model: nn.Module, n_layers: int) -> nn.ModuleList | None:
    """The first ``nn.ModuleList`` of ``n_layers`` modules (the decoder layers: GPT-2's ``h``, Llama's ``layers``)."""
    for _name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n_layers:
            return m
    return None


def hf_states(model: nn.Module, inputs: Mapping) -> tuple[list[Tensor], list[Tensor], str]:
    """Hidden states (each decoder layer's output), attention weights (B, H, T, T) and where the states came from.

    The states are the outputs of the model's decoder layers when a layer list matches the number of attention
    layers and its outputs equal ``hidden_states[1:-1]`` ("layer outputs"); else ``hidden_states[1:]``
    ("hidden_states": the last one after the final norm).
    """
    captured: list[Tensor] = []

    def on_layer(_m, _inp, out):
        first = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(first, Tensor):
            captured.append(first.detach())

    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    layers = _layer_list(model, int(n_layers)) if isinstance(n_layers, int) and n_layers > 0 else None
    handles = [layer.register_forward_hook(on_layer) for layer in layers] if layers is not None else []
    try:
        with eager_attention(model):
            out = model(**inputs, output_hidden_states=True, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    attentions = getattr(out, "attentions", None)
    states = getattr(out, "hidden_states", None)
    if not attentions or any(a is None for a in attentions) or not states:
        raise ValueError(f"{type(model).__name__} returned no attention weights or hidden states; load a causal "
                         "language model that supports output_attentions (eager attention)")
    states = [h.detach() for h in states[1:]]
    same = (len(captured) == len(states) == len(attentions)
            and all(c.shape == s.shape for c, s in zip(captured, states))
            and all(torch.equal(c, s) for c, s in zip(captured[:-1], states[:-1])))
    if same:
        return captured, [a.detach() for a in attentions], "layer outputs"
    return states, [a.detach() for a in attentions], "hidden_states"


def _top_entries(a: np.ndarray, keep: np.ndarray, k: int, offset: int) -> np.ndarray:
    """The ``k`` largest |h| of one batch (B, T, d) at valid positions: rows (|h|, sequence, token, dim).

    Ties go to the first entry in (sequence, token, dim) order (a stable sort).
    """
    flat = np.where(keep[..., None], a, -np.inf).ravel()
    order = np.argsort(-flat, kind="stable")[:k]
    order = order[np.isfinite(flat[order])]
    n, t, j = np.unravel_index(order, a.shape)
    return np.stack([flat[order], n + offset, t, j], axis=1).astype(np.float64)


@register_probe
@dataclass(frozen=True, kw_only=True)
class MassiveActivations(Probe):
    """Massive residual-stream activations (Sun et al. 2024) and attention-sink heads (Xiao et al. 2024).

    Needs a transformer: lossatlas's GPT (model "gpt") or a Hugging Face causal LM fed dict batches; any other
    model (an MLP, a CNN) is refused.

    Attributes:
        ratio: an entry is massive when |h| ≥ ratio × the median |h| of its layer (and above min_value);
            Sun et al. 2024 use about 1000.
        min_value: an entry is massive only when |h| > min_value (and ratio × median); Sun et al. 2024 use 100.
        sink_threshold: a head is an attention sink when its mean attention on the first token (queries after it)
            exceeds this share, in [0, 1].
        top_k: the largest |h| of each layer stored with their (sequence, token, dimension) positions.
        max_batches: read at most this many batches (None: all); every hidden state read is kept until the
            medians are taken.
    """

    name: ClassVar[str] = "massive_activations"
    summary: ClassVar[str] = "massive residual-stream activations and attention-sink heads per layer/head"
    section: ClassVar[str] = "representations"
    title: ClassVar[str] = "Massive activations and attention sinks"
    figure: ClassVar[str | None] = "massive_activations"
    usage: ClassVar[str] = "--steps last"
    ratio: float = RATIO
    min_value: float = MIN_VALUE
    sink_threshold: float = SINK_THRESHOLD
    top_k: int = 3
    max_batches: int | None = None

    def validate(self) -> None:
        """ValueError for a setting out of range.

        Refuses a ratio or min_value that is not finite and ≥ 0, a sink_threshold outside [0, 1], a top_k that is
        not a positive integer and a max_batches that is not a positive integer or None.
        """
        check_finite_number("ratio", self.ratio, minimum=0.0)
        check_finite_number("min_value", self.min_value, minimum=0.0)
        check_finite_number("sink_threshold", self.sink_threshold, minimum=0.0)
        if self.sink_threshold > 1.0:
            raise ValueError(f"sink_threshold must be in [0, 1], got {self.sink_threshold!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.max_batches is not None and (isinstance(self.max_batches, bool) or not isinstance(self.max_batches, int)
                                             or self.max_batches <= 0):
            raise ValueError(f"max_batches must be a positive integer or None, got {self.max_batches!r}")

    def _states(self, model: nn.Module, inputs: Any) -> tuple[list[Tensor], list[Tensor], Tensor, str]:
        """(hidden states, attention weights, valid positions (B, T) bool, source) of one batch."""
        if isinstance(inputs, Mapping):
            if not hasattr(model, "config"):
                raise ValueError(f"{type(model).__name__} got dict batches but is not a Hugging Face model; "
                                 "massive_activations reads Hugging Face transformers or lossatlas's GPT")
            hidden, attn, source = hf_states(model, inputs)
            mask = inputs.get("attention_mask")
            shape = hidden[0].shape[:2]
            valid = mask.detach().cpu() != 0 if isinstance(mask, Tensor) and tuple(mask.shape) == tuple(shape) \
                else torch.ones(shape, dtype=torch.bool)
            return hidden, attn, valid, source
        if _is_gpt(model):
            hidden, attn = gpt_states(model, inputs)
            return hidden, attn, torch.ones(hidden[0].shape[:2], dtype=torch.bool), "block outputs"
        raise ValueError(f"{type(model).__name__} has no attention layers or residual stream; massive_activations "
                         "needs a transformer (lossatlas's GPT, model 'gpt', or a Hugging Face causal LM)")

    def run(self, ctx: ProbeContext) -> Result:
        """Massive entries, top-k |h| and sink mass from one forward per batch (the model in eval mode).

        Per layer (dim "layer"): ``layer_max_abs``, ``layer_median_abs``, ``layer_max_ratio`` (max|h|/median|h|),
        ``layer_num_massive`` (entries), ``layer_num_massive_dims`` (feature dimensions with a massive entry),
        ``layer_first_token_share`` (share of the massive entries at each sequence's first token) and
        ``layer_sink_share`` (share of the layer's heads that are sinks); ``massive_dims`` (layer, feature) bool;
        per layer and rank (dim "rank", largest first): ``top_abs``, ``top_value`` (signed), ``top_ratio``
        (|h|/median), ``top_sequence``, ``top_token``, ``top_dim`` (NaN and −1 past the number of entries); per
        layer and head: ``sink_mass`` and ``sink_heads`` (bool). Scalars: ``num_massive_layers``,
        ``num_massive_dims`` (distinct dimensions massive in some layer), ``max_ratio``, ``num_sink_heads``,
        ``sink_head_share`` and ``max_sink_mass``. ValueError for a model that is not a transformer.
        """
        start = time.perf_counter()
        model = ctx.model
        flags = [(m, m.training) for m in model.modules()]  # every train/eval flag, restored exactly afterwards
        model.eval()
        signed: list[list[np.ndarray]] = []  # per layer, per batch: h (B, T, d) in float64 (|h| taken per layer later)
        valids: list[np.ndarray] = []  # per batch: (B, T) valid positions
        sums: list[Tensor] = []  # per layer: Σ attention on the first token, per head
        queries = 0
        source = ""
        try:
            with torch.no_grad():
                for i, (inputs, _targets) in enumerate(ctx.data):
                    if self.max_batches is not None and i >= self.max_batches:
                        break
                    hidden, attn, valid, source = self._states(model, inputs)
                    if not hidden or len(attn) != len(hidden):
                        raise ValueError(f"{type(model).__name__} gave {len(hidden)} hidden states but {len(attn)} "
                                         "attention layers; massive_activations needs one of each per layer")
                    if not signed:
                        signed = [[] for _ in hidden]
                        sums = [torch.zeros(a.shape[1], dtype=torch.float64) for a in attn]
                    for li, h in enumerate(hidden):
                        signed[li].append(h.to(torch.float64).cpu().numpy())
                    valids.append(valid.numpy())
                    for li, a in enumerate(attn):
                        s, n = _sink_sums(a.to(torch.float64).cpu(), valid)
                        sums[li] += s
                    queries += n  # the same valid queries in every layer: counted once per batch
        finally:
            for m, flag in flags:
                m.training = flag
        if not signed:
            raise ValueError("massive_activations read no batch; give at least one")
        if queries == 0:
            raise ValueError("massive_activations needs sequences of at least two tokens (the sink mass averages the "
                             "queries after the first); give longer sequences")
        return self._result(ctx.step, signed, valids, sums, queries, source, start)

    def _result(self, step, signed, valids, sums, queries, source, start) -> Result:
        """The Result of the stored batches (see ``run``)."""
        res = self.new_result(step)
        n_layers, width, k = len(signed), signed[0][0].shape[-1], self.top_k
        firsts = [v.astype(np.int8).argmax(axis=1) for v in valids]  # f_n per batch: each sequence's first token
        stats = {key: np.zeros(n_layers) for key in ("max_abs", "median_abs", "max_ratio", "first_token_share")}
        counts = np.zeros(n_layers, dtype=np.int64)
        dims = np.zeros((n_layers, width), dtype=bool)
        top = {key: np.full((n_layers, k), np.nan) for key in ("top_abs", "top_value", "top_ratio")}
        pos = {key: np.full((n_layers, k), -1, dtype=np.int64) for key in ("top_sequence", "top_token", "top_dim")}
        for li, layer_states in enumerate(signed):
            chunks = [np.abs(h) for h in layer_states]  # |h| of this layer only (one layer's copy at a time)
            median = float(np.median(np.concatenate([a[v].ravel() for a, v in zip(chunks, valids)])))
            first_count, rows, offset = 0, [], 0
            for b, (a, v, f) in enumerate(zip(chunks, valids, firsts)):
                massive = is_massive(a, median, self.ratio, self.min_value) & v[..., None]  # valid positions only
                counts[li] += int(massive.sum())
                dims[li] |= massive.any(axis=(0, 1))
                first_count += int(massive[np.arange(len(f)), f].sum())
                found = _top_entries(a, v, k, offset)
                for r in found:
                    r_value = layer_states[b][int(r[1]) - offset, int(r[2]), int(r[3])]
                    rows.append((*r, r_value))
                offset += a.shape[0]
            rows.sort(key=lambda r: -r[0])  # stable: ties stay in (sequence, token, dim) order
            for rank, (value, n, t, j, sv) in enumerate(rows[:k]):
                top["top_abs"][li, rank], top["top_value"][li, rank] = value, sv
                top["top_ratio"][li, rank] = value / median if median > 0 else math.inf
                pos["top_sequence"][li, rank], pos["top_token"][li, rank], pos["top_dim"][li, rank] = n, t, j
            largest = float(top["top_abs"][li, 0])
            stats["max_abs"][li], stats["median_abs"][li] = largest, median
            stats["max_ratio"][li] = largest / median if median > 0 else math.inf
            stats["first_token_share"][li] = first_count / counts[li] if counts[li] else 0.0
        mass = torch.stack(sums).numpy() / queries  # (layer, head)
        sinks = mass > self.sink_threshold
        layer = {"layer": np.arange(n_layers)}
        for key, v in stats.items():
            res.add(f"layer_{key}", v, ("layer",), layer)
        res.add("layer_num_massive", counts, ("layer",), layer)
        res.add("layer_num_massive_dims", dims.sum(axis=1).astype(np.int64), ("layer",), layer)
        res.add("layer_sink_share", sinks.mean(axis=1), ("layer",), layer)
        res.add("massive_dims", dims, ("layer", "feature"), {**layer, "feature": np.arange(width)})
        ranks = {**layer, "rank": np.arange(k)}
        for key, v in {**top, **pos}.items():
            res.add(key, v, ("layer", "rank"), ranks)
        heads = {**layer, "head": np.arange(mass.shape[1])}
        res.add("sink_mass", mass, ("layer", "head"), heads)
        res.add("sink_heads", sinks, ("layer", "head"), heads)
        res.add("num_massive_layers", np.int64((counts > 0).sum()))
        res.add("num_massive_dims", np.int64(dims.any(axis=0).sum()))
        res.add("max_ratio", np.float64(stats["max_ratio"].max()))
        res.add("num_sink_heads", np.int64(sinks.sum()))
        res.add("sink_head_share", np.float64(sinks.mean()))
        res.add("max_sink_mass", np.float64(mass.max()))
        res.meta.update({
            "criterion": f"|h| > {self.min_value:g} and |h| >= {self.ratio:g} x median|h| of the layer",
            "sink": f"mean attention on the first token over later queries > {self.sink_threshold:g}",
            "hidden_states": source, "num_sequences": int(sum(v.shape[0] for v in valids)),
            "num_tokens": int(sum(v.sum() for v in valids)), "num_queries": int(queries),
            "elapsed_s": time.perf_counter() - start})
        return res
