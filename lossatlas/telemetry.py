"""Instability telemetry: cheap per-step scalars that precede loss spikes.

``InstabilityMonitor`` puts forward hooks on a model and reduces what they see to scalar
tensors inside the hook (one ``amax`` or ``logsumexp`` each, no host sync); ``collect()`` stacks
them with Adam's second-moment statistics and fetches everything with one device sync:

- ``attn_logit_max/<layer>``: max |z_ij| over the causal lower triangle of the pre-softmax
  attention logits z = q kᵀ/√d_h, for every module named ``*.logits_hook`` (the reference GPT's
  ``blocks.<i>.attn.logits_hook``; the layer is ``blocks.<i>``). Attention-logit growth
  (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training instabilities",
  arXiv 2309.14322): q_i = k_j = s·u (unit u) gives s²/√d_h.
- ``output_logz_mean``, ``output_logit_max``: mean over tokens of log Z = logsumexp of the model's
  output logits, and their largest entry. Output-logit divergence (Wortsman et al. 2023;
  PaLM's z-loss 1e-4·log²Z, Chowdhery et al. 2022).
- ``act_max/<block>``: max |activation| at the output of each block (the children of the model's
  ``nn.ModuleList``s by default). Residual-stream growth (Takase et al., "Spike No More", arXiv 2312.16903).
- ``adam_v_max``, ``adam_v_mean``: max and mean of Adam's second moment v over all parameters;
  ``adam_update_rms``, ``adam_update_max``: RMS and max |u| of the preconditioned update
  u = m̂/(√v̂ + ε) (bias-corrected, before the learning rate); ``adam_eps_frac``: fraction of
  entries with √v̂ < ε (ε comparable to the gradient RMS shrinks updates, Wortsman et al. 2023).
- ``group_loss/<name>``: losses per data group passed to ``collect`` (opposing signals,
  Rosenfeld & Risteski 2023, arXiv 2311.04163).

``AttentionHeadMonitor`` adds, per layer and head, the maximum attention logit
``attn_max_logit/layer<i>/head<h>`` (the MaxLogit of Kimi K2's QK-Clip), the attention entropy
``attn_entropy/layer<i>/head<h>`` and the attention-sink mass ``attn_sink/layer<i>/head<h>`` (mean attention on
key 0), for the reference GPT and Hugging Face GPT-2 / Llama-style attention.

Hook values are the extremes (and the mean) over every forward since the last ``collect()``.
The monitor never changes the model's outputs, parameters or train/eval flag.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

ADAM_TYPES = (torch.optim.Adam, torch.optim.AdamW)


def _layer_name(module_name: str) -> str:
    """``blocks.0.attn.logits_hook`` -> ``blocks.0``."""
    name = module_name.removesuffix(".logits_hook").removesuffix("logits_hook")
    return name.removesuffix(".attn") or "model"


def _at_least_float32(t: Tensor) -> Tensor:
    """Half-precision tensors are reduced in float32; float32/float64 keep their precision."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def default_blocks(model: nn.Module) -> list[str]:
    """The names of the children of every ``nn.ModuleList`` in ``model`` (transformer blocks)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList):
            out.extend(f"{name}.{child}" if name else child for child, _ in m.named_children())
    return out


class InstabilityMonitor:
    """Per-step instability telemetry from forward hooks and the optimizer state.

    Args:
        model: the network (hooks are added now and removed by ``close()``).
        optimizer: Adam/AdamW to report second-moment statistics for; other optimizers or None
            give no ``adam_*`` values.
        groups: names of data groups whose losses ``collect`` will be given (``group_loss/<name>``);
            None accepts any name.
        blocks: module names whose output magnitude to track (default: ``default_blocks``).
        output_logits: track the model output's log Z and max logit (the output must be logits
            over the last axis).

    Usage::

        monitor = InstabilityMonitor(model, opt)
        ...; opt.step()
        rec.step(step, loss=loss.item(), **monitor.collect())
        monitor.close()
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 groups: Sequence[str] | None = None, blocks: Sequence[str] | None = None,
                 output_logits: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.groups = None if groups is None else tuple(str(g) for g in groups)
        modules = dict(model.named_modules())
        block_names = default_blocks(model) if blocks is None else list(blocks)
        unknown = [b for b in block_names if b not in modules]
        if unknown:
            raise ValueError(f"no module named {', '.join(map(repr, unknown))} in the model; "
                             "pass names from model.named_modules() as blocks")
        self._max: dict[str, Tensor] = {}  # running maxima since the last collect
        self._sum: dict[str, Tensor] = {}  # running sums (and counts) for means
        self._count: dict[str, int] = {}
        self._masks: dict[tuple[int, int, torch.device], Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for name, m in modules.items():
            if name.endswith("logits_hook"):
                self._handles.append(m.register_forward_hook(self._attention_hook(f"attn_logit_max/{_layer_name(name)}")))
        for b in block_names:
            self._handles.append(modules[b].register_forward_hook(self._activation_hook(f"act_max/{b}")))
        if output_logits:
            self._handles.append(model.register_forward_hook(self._output_hook))

    # -- hooks: reduce to scalar tensors, never sync --------------------------------------------
    def _update_max(self, key: str, value: Tensor) -> None:
        value = _at_least_float32(value.detach())
        prev = self._max.get(key)
        self._max[key] = value if prev is None else torch.maximum(prev, value)

    def _causal(self, T: int, S: int, device: torch.device) -> Tensor:
        key = (T, S, device)
        if key not in self._masks:
            self._masks[key] = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)
        return self._masks[key]

    def _attention_hook(self, key: str):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            if not isinstance(out, Tensor) or out.ndim < 2:
                return
            z = out.detach()  # (B, nh, T, S); future keys (above the diagonal) are masked later
            mask = self._causal(z.shape[-2], z.shape[-1], z.device)
            self._update_max(key, torch.where(mask, z.abs(), torch.zeros((), dtype=z.dtype, device=z.device)).amax())
        return hook

    def _activation_hook(self, key: str):
        def hook(module: nn.Module, args: tuple, out) -> None:
            if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
                out = out[0]
            if isinstance(out, Tensor) and out.numel() and out.is_floating_point():
                self._update_max(key, out.detach().abs().amax())
        return hook

    def _output_hook(self, module: nn.Module, args: tuple, out) -> None:
        if not isinstance(out, Tensor) or out.ndim < 2 or not out.is_floating_point():
            return
        logits = _at_least_float32(out.detach())
        logz = torch.logsumexp(logits, dim=-1)  # (B,) or (B, T)
        self._sum["output_logz_mean"] = self._sum.get("output_logz_mean", 0) + logz.sum()
        self._count["output_logz_mean"] = self._count.get("output_logz_mean", 0) + logz.numel()
        self._update_max("output_logit_max", logits.amax())

    # -- the optimizer --------------------------------------------------------------------------
    @torch.no_grad()
    def _adam_stats(self) -> dict[str, Tensor]:
        opt = self.optimizer
        if not isinstance(opt, ADAM_TYPES):
            return {}
        v_max = v_sum = u_sq = u_max = n_eps = None
        count = 0
        for group in opt.param_groups:
            beta1, beta2 = group["betas"]
            eps = group["eps"]
            for p in group["params"]:
                st = opt.state.get(p)
                if not st or "exp_avg_sq" not in st:
                    continue
                step = float(st["step"])
                m, v = _at_least_float32(st["exp_avg"]), _at_least_float32(st["exp_avg_sq"])
                v_hat = v / (1 - beta2**step)
                denom = v_hat.sqrt()
                u = (m / (1 - beta1**step)) / (denom + eps)
                parts = (v.amax(), v.sum(), (u * u).sum(), u.abs().amax(), (denom < eps).sum().float())
                if v_max is None:
                    v_max, v_sum, u_sq, u_max, n_eps = parts
                else:
                    v_max, u_max = torch.maximum(v_max, parts[0]), torch.maximum(u_max, parts[3])
                    v_sum, u_sq, n_eps = v_sum + parts[1], u_sq + parts[2], n_eps + parts[4]
                count += v.numel()
        if v_max is None:
            return {}
        return {"adam_v_max": v_max, "adam_v_mean": v_sum / count, "adam_update_rms": (u_sq / count).sqrt(),
                "adam_update_max": u_max, "adam_eps_frac": n_eps / count}

    # -- the per-step call ----------------------------------------------------------------------
    def collect(self, group_losses: Mapping[str, float] | None = None) -> dict[str, float]:
        """This step's telemetry (one device sync); resets the hook accumulators.

        Call once per step after ``optimizer.step()``. ``group_losses`` maps data-group names to
        their losses this step; they are returned as ``group_loss/<name>``.
        """
        if self._handles is None:
            raise ValueError("this InstabilityMonitor is closed; create a new one to keep monitoring")
        tensors: dict[str, Tensor] = dict(self._max)
        for k, s in self._sum.items():
            tensors[k] = s / max(self._count[k], 1)
        tensors.update(self._adam_stats())
        self._max, self._sum, self._count = {}, {}, {}
        row: dict[str, float] = {}
        if tensors:
            dev = next(iter(tensors.values())).device
            stacked = torch.stack([t.detach().to(dev, torch.float64).reshape(()) for t in tensors.values()])
            row.update(zip(tensors, stacked.tolist()))  # the one sync
        for name, value in (group_losses or {}).items():
            if self.groups is not None and name not in self.groups:
                raise ValueError(f"unknown data group {name!r}; this monitor was created with groups "
                                 f"{', '.join(self.groups) or '(none)'}")
            row[f"group_loss/{name}"] = float(value)
        return row

    def close(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles or ():
            h.remove()
        self._handles = None  # type: ignore[assignment]
        self._max, self._sum, self._count = {}, {}, {}

    def __enter__(self) -> "InstabilityMonitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AttentionHeadMonitor:
    """Per-head maximum attention logit and attention entropy, per layer, from forward hooks.

    For every attention layer ℓ and head h, over the (query i, key j) pairs a query may attend to
    (causal lower triangle, and the model's attention mask when it passes one), over every example
    and every forward since the last ``collect()``:

    - ``attn_max_logit/layer<ℓ>/head<h>``: MaxLogit = max_{i,j} s·q_i·k_j, s the module's scaling
      (1/√d_h), with q, k after any qk-norm and rotary embedding: the quantity Kimi K2's QK-Clip caps
      (Kimi Team 2025, "Kimi K2: Open Agentic Intelligence", arXiv 2507.20534). Signed (not |z|).
    - ``attn_entropy/layer<ℓ>/head<h>``: the mean over queries of −Σ_j p_ij log p_ij, p_i = softmax_j of
      the same logits; its collapse precedes instabilities (Zhai et al. 2023, "Stabilizing Transformer
      Training by Preventing Attention Entropy Collapse", ICML).
    - ``attn_sink/layer<ℓ>/head<h>``: the mean over queries at positions ≥ 1 of p_i0, the attention on the
      first key (an attention sink when above 0.5: Xiao et al. 2024, "Efficient Streaming Language Models with
      Attention Sinks", ICLR); a masked key 0 (left padding) counts as 0. The ``massive_activations`` probe
      measures the same at checkpoints, with padding handled per sequence.

    Layers are numbered in ``model.named_modules()`` order (``self.layers`` holds their module names).
    Three kinds of attention module are found:

    - the reference GPT's (``lossatlas.models.gpt``): a forward hook on ``<attn>.logits_hook`` sees
      the logits it computed itself (no extra matmul);
    - Hugging Face GPT-2 (``GPT2Attention``): q, k are the first two thirds of ``c_attn``'s output;
    - Hugging Face Llama-style (``q_proj``/``k_proj`` and ``position_embeddings``, e.g. ``LlamaAttention``):
      q, k from the projections' outputs, then the model's own qk-norm (if any), its
      ``apply_rotary_pos_emb`` and the grouped-query repeat.

    For the Hugging Face modules the logits q kᵀ are recomputed once per layer (one batched matmul,
    what eager attention does anyway); the hooks only read detached tensors under ``no_grad`` and
    return None, so the outputs and gradients are those of the unhooked model. Hooks that fire inside
    ``torch.func`` transforms (the curvature products) are skipped.

    Args:
        model: the network (hooks are added now and removed by ``close()``).
        examples: reduce over the first ``examples`` sequences of each batch only (None, the default:
            all): the cost is O(examples·heads·T²) per layer; a subsample gives a lower bound of MaxLogit.

    Usage::

        heads = AttentionHeadMonitor(model)
        ...; loss.backward(); opt.step()
        rec.step(step, loss=loss.item(), **heads.collect())
        heads.close()
    """

    def __init__(self, model: nn.Module, *, examples: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int) or examples < 1):
            raise ValueError(f"examples must be a positive number of sequences or None (all), got {examples!r}")
        self.model = model
        self.examples = examples
        self._bias: dict[tuple, Tensor] = {}  # causal additive masks by (T, S, device, dtype)
        self.layers: list[str] = []
        self.heads: list[int] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._stats: dict[int, list[Tensor]] = {}  # layer -> [max, entropy sum, rows, sink sum, sink rows] (H,)
        self._stash: dict[int, dict[str, Any]] = {}  # per-layer q/k outputs and forward kwargs
        for name, m in model.named_modules():
            if isinstance(getattr(m, "logits_hook", None), nn.Module) and hasattr(m, "n_head"):
                self._add(name, int(m.n_head))
                self._handles.append(m.logits_hook.register_forward_hook(self._own_hook(len(self.layers) - 1)))
            elif hasattr(m, "c_attn") and hasattr(m, "split_size") and not getattr(m, "is_cross_attention", False):
                self._add(name, int(m.num_heads))
                self._hook_hf(m, len(self.layers) - 1, ("c_attn",))
            elif hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "head_dim") and hasattr(m, "scaling") \
                    and _rotary(m) is not None:
                heads = int(getattr(m.config, "num_attention_heads", m.q_proj.out_features // m.head_dim))
                self._add(name, heads)
                self._hook_hf(m, len(self.layers) - 1, ("q_proj", "k_proj"))
        if not self.layers:
            raise ValueError("no attention module found (the reference GPT's, Hugging Face GPT-2 or Llama-style); "
                             "per-head attention telemetry needs one")

    def _add(self, name: str, heads: int) -> None:
        self.layers.append(name)
        self.heads.append(heads)

    def names(self) -> list[str]:
        """Every log name this monitor can produce (declared up front in the run file)."""
        out = []
        for kind in ("attn_max_logit", "attn_entropy", "attn_sink"):
            out += [f"{kind}/layer{i}/head{h}" for i, n in enumerate(self.heads) for h in range(n)]
        return out

    # -- hooks ------------------------------------------------------------------------------------
    def _own_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            if isinstance(out, Tensor) and out.ndim == 4 and not _in_transform():
                self._reduce(layer, out, None)
        return hook

    def _hook_hf(self, attn: nn.Module, layer: int, projections: tuple[str, ...]) -> None:
        stash = self._stash.setdefault(layer, {})

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            stash.clear()
            stash["kwargs"] = kwargs  # attention_mask, position_embeddings (read in post)

        def projection(key: str):
            def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
                stash[key] = out
            return hook

        def post(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            got = dict(stash)
            stash.clear()
            if _in_transform() or not all(isinstance(got.get(p), Tensor) for p in projections):
                return
            with torch.no_grad():
                q, k = self._hf_qk(module, got)
                z = (q @ k.transpose(-2, -1)) * float(module.scaling)  # (B, H, T, S), as eager attention
                self._reduce(layer, z, got.get("kwargs", {}).get("attention_mask"))

        self._handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        for p in projections:
            self._handles.append(getattr(attn, p).register_forward_hook(projection(p)))
        self._handles.append(attn.register_forward_hook(post, with_kwargs=True))

    @staticmethod
    def _hf_qk(module: nn.Module, got: dict) -> tuple[Tensor, Tensor]:
        """(B, H, T, d) queries and keys exactly as the module's forward builds them."""
        if "c_attn" in got:  # GPT-2: [q | k | v] along the last axis, no rotary embedding
            qkv = got["c_attn"].detach()
            q, k, _ = qkv.split(module.split_size, dim=-1)
            d = module.head_dim
            return (q.reshape(*q.shape[:-1], -1, d).transpose(1, 2), k.reshape(*k.shape[:-1], -1, d).transpose(1, 2))
        d = module.head_dim
        q, k = got["q_proj"].detach(), got["k_proj"].detach()
        q, k = q.reshape(*q.shape[:-1], -1, d), k.reshape(*k.shape[:-1], -1, d)
        if getattr(module, "q_norm", None) is not None:  # qk-norm before the transpose (Qwen3, OLMo-2 style)
            q, k = module.q_norm(q), module.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos_sin = got.get("kwargs", {}).get("position_embeddings")
        if cos_sin is not None:
            q, k = _rotary(module)(q, k, *cos_sin)
        groups = q.shape[1] // k.shape[1]
        if groups > 1:  # grouped-query attention: each key head serves `groups` query heads
            k = k.repeat_interleave(groups, dim=1)
        return q, k

    def _causal_bias(self, T: int, S: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(T, S) additive mask: 0 where query i may see key j (j ≤ i + S − T), −inf above (cached)."""
        key = (T, S, device, dtype)
        if key not in self._bias:
            keep = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)
            self._bias[key] = torch.zeros(T, S, dtype=dtype, device=device).masked_fill(~keep, float("-inf"))
        return self._bias[key]

    @torch.no_grad()
    def _reduce(self, layer: int, z: Tensor, mask: Any) -> None:
        """Fold the logits z (B, H, T, S) of one forward into the layer's running max / entropy sums.

        Per query row, with m = max_j z_j over the allowed keys and p = softmax: log Z = m − log max_j p_j
        (p_j = exp(z_j − log Z) at j = argmax), so the entropy −Σ p log p = log Z − Σ_j p_j z_j costs one
        softmax and one dot product beyond the masking (no second exp pass, no host sync).
        """
        z = _at_least_float32(z.detach())
        if self.examples is not None:  # the first `examples` sequences of the batch only
            z = z[: self.examples]
            mask = mask[: self.examples] if isinstance(mask, Tensor) and mask.ndim == 4 else mask
        T, S = z.shape[-2], z.shape[-1]
        zm = z + self._causal_bias(T, S, z.device, z.dtype)  # masked entries −inf, causal with a cache offset
        if isinstance(mask, Tensor) and mask.ndim == 4:  # the model's mask: bool keep, or additive 0 / large negative
            keep = mask[..., -S:] if mask.dtype == torch.bool else mask[..., -S:] > torch.finfo(mask.dtype).min / 2
            zm = zm.masked_fill(~keep, float("-inf"))
        m = zm.amax(dim=-1)  # (B, H, T) row maxima; −inf for a query with no allowed key
        p = torch.softmax(zm, dim=-1)  # zero at the masked keys (z finite there: p·z = 0); NaN rows if all masked
        ent = m - torch.log(p.amax(dim=-1)) - torch.linalg.vecdot(p, z)  # log Z − Σ p z, per query
        valid = torch.isfinite(m)  # queries with at least one allowed key; the others are skipped
        zero = torch.zeros((), dtype=z.dtype, device=z.device)
        mx = m.amax(dim=(0, 2))  # (H,): −inf rows never win
        ent_sum = torch.where(valid, ent, zero).sum(dim=(0, 2))
        rows = valid.sum(dim=(0, 2)).to(z.dtype)
        later = valid.clone()
        later[:, :, : max(T - S + 1, 0)] = False  # the query at absolute position 0 (S − T cached keys before row 0)
        sink_sum = torch.where(later, p[..., 0], zero).sum(dim=(0, 2))  # attention on key 0 (Xiao et al. 2024)
        sink_rows = later.sum(dim=(0, 2)).to(z.dtype)
        now = [mx, ent_sum, rows, sink_sum, sink_rows]
        prev = self._stats.get(layer)
        if prev is None:
            self._stats[layer] = now
        else:
            self._stats[layer] = [torch.maximum(prev[0], mx), *(a + b for a, b in zip(prev[1:], now[1:]))]

    # -- the per-step call --------------------------------------------------------------------------
    def collect(self) -> dict[str, float]:
        """This step's per-head values (one device sync); resets the accumulators."""
        if self._handles is None:
            raise ValueError("this AttentionHeadMonitor is closed; create a new one to keep monitoring")
        stats, self._stats = self._stats, {}
        if not stats:
            return {}
        names, parts = [], []
        for layer in sorted(stats):
            mx, ent_sum, rows, sink_sum, sink_rows = stats[layer]
            H = mx.shape[0]
            names += [f"attn_max_logit/layer{layer}/head{h}" for h in range(H)]
            names += [f"attn_entropy/layer{layer}/head{h}" for h in range(H)]
            names += [f"attn_sink/layer{layer}/head{h}" for h in range(H)]
            parts += [mx.double(), (ent_sum / rows.clamp(min=1)).double()]
            # NaN for a layer that saw no query after the first token (sequences of one token)
            parts.append(torch.where(sink_rows > 0, sink_sum / sink_rows.clamp(min=1), torch.nan).double())
        dev = parts[0].device
        values = torch.cat([p.to(dev) for p in parts]).tolist()  # the one sync
        return dict(zip(names, values))

    def close(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles or ():
            h.remove()
        self._handles = None  # type: ignore[assignment]
        self._stats, self._stash = {}, {}

    def __enter__(self) -> "AttentionHeadMonitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def head_array(columns: Mapping[str, Any], kind: str = "attn_max_logit") -> np.ndarray:
    """(steps, layers, heads) array of ``kind`` ("attn_max_logit", "attn_entropy" or "attn_sink") from run-log columns.

    ``columns`` maps log names to (steps,) arrays (``run.log`` columns); absent heads are NaN.
    """
    import re

    pat = re.compile(rf"^{re.escape(kind)}/layer(\d+)/head(\d+)$")
    found = {(int(m.group(1)), int(m.group(2))): n for n in columns if (m := pat.match(n))}
    if not found:
        raise ValueError(f"no {kind}/layer<i>/head<h> columns in the log; record with attention_heads=True")
    L, H = max(i for i, _ in found) + 1, max(h for _, h in found) + 1
    T = len(next(iter(columns[n] for n in found.values())))
    out = np.full((T, L, H), np.nan)
    for (i, h), n in found.items():
        out[:, i, h] = np.asarray(columns[n], dtype=np.float64)
    return out


def _rotary(module: nn.Module) -> Any:
    """The ``apply_rotary_pos_emb`` of the module's own modeling file (None: not a rotary attention)."""
    import sys

    return getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)


def _in_transform() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp) is active: hooks then do nothing."""
    check = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(check()) if check is not None else False


def z_loss(logits: Tensor, coefficient: float = 1e-4) -> Tensor:
    """z-loss = coefficient · mean over tokens of (log Z)², Z = Σ_v exp(logit_v) (PaLM, Chowdhery et al. 2022)."""
    if coefficient < 0 or not math.isfinite(coefficient):
        raise ValueError(f"z-loss coefficient must be a non-negative number (PaLM uses 1e-4), got {coefficient}")
    return coefficient * torch.logsumexp(logits, dim=-1).pow(2).mean()
