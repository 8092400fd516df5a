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

Hook values are the extremes (and the mean) over every forward since the last ``collect()``.
The monitor never changes the model's outputs, parameters or train/eval flag.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

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


def z_loss(logits: Tensor, coefficient: float = 1e-4) -> Tensor:
    """z-loss = coefficient · mean over tokens of (log Z)², Z = Σ_v exp(logit_v) (PaLM, Chowdhery et al. 2022)."""
    if coefficient < 0 or not math.isfinite(coefficient):
        raise ValueError(f"z-loss coefficient must be a non-negative number (PaLM uses 1e-4), got {coefficient}")
    return coefficient * torch.logsumexp(logits, dim=-1).pow(2).mean()
