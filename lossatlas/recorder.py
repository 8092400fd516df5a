"""``Recorder``: the object a user adds to their training loop to write a run file.

    rec = lossatlas.Recorder("run.h5", model, optimizer=opt, model_spec={...}, data_spec={...},
                             loss="cross_entropy", checkpoint_every=100)
    for step in range(1, steps + 1):
        ...; loss.backward(); opt.step()
        rec.step(step, loss=loss.item())   # after optimizer.step(), before zero_grad()
    rec.close()                            # or use `with Recorder(...) as rec:`

Per step it logs, cheaply (on the CPU one C pass over gradients and weights; on an accelerator
one fused copy into a ring buffer reduced in blocks, no host sync; ``norms.py``): loss, learning
rate, global gradient norm, per-tensor gradient norm, weight norm and update-to-weight ratio
‖w_t − w_{t−1}‖/‖w_t‖, plus any extra scalars passed to ``step``.
Checkpoints (parameters, buffers and optimizer state) are written on a schedule: every k steps,
log-spaced, or an explicit list.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lossatlas import store
from lossatlas.norms import norm_tracker

FLUSH_EVERY = 16384  # log rows buffered before a write (a checkpoint or close writes them too) ...
FLUSH_SECONDS = 10.0  # ... or after this long, so that `lossatlas info` on a live run lags at most this much


def checkpoint_schedule(*, every: int | None = None, steps: Iterable[int] | None = None,
                        log_spaced: int | None = None, max_steps: int | None = None) -> set[int] | None:
    """The steps to checkpoint: explicit ``steps``, or ``log_spaced`` points in [1, max_steps] plus 0.

    Returns None for "every ``every`` steps" (checked arithmetically), an empty set for never.
    """
    if steps is not None:
        return {int(s) for s in steps}
    if log_spaced is not None:
        if not max_steps or max_steps < 1:
            raise ValueError("log-spaced checkpoints need max_steps (the last training step)")
        num = min(int(log_spaced), max_steps)  # more points than steps in [1, max_steps] would only repeat
        pts = np.unique(np.round(np.logspace(0, math.log10(max_steps), num)).astype(int))
        return {0, *map(int, pts)}
    if every is None:
        return set()
    if every <= 0:
        raise ValueError(f"checkpoint_every must be a positive number of steps, got {every}")
    return None


def optimizer_spec(optimizer: torch.optim.Optimizer | None) -> dict | None:
    """A JSON-able description of an optimizer: class name and its default hyper-parameters."""
    if optimizer is None:
        return None
    defaults = {}
    for k, v in optimizer.defaults.items():
        if isinstance(v, (bool, int, float, str)) or v is None:
            defaults[k] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(t, (int, float)) for t in v):
            defaults[k] = list(v)
    return {"name": type(optimizer).__name__, "defaults": defaults}


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer's per-parameter state keyed by the parameter's name in ``model``."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state or id(p) not in names:
                continue
            entry = {}
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    entry[k] = v.detach().cpu()
                elif isinstance(v, (int, float)):
                    entry[k] = torch.tensor(v)
            out[names[id(p)]] = entry
    return out


class Recorder:
    """Writes a lossatlas run file from a training loop: telemetry every step, checkpoints on a schedule.

    Args:
        path: the run file to create (refused if it exists, unless ``overwrite``).
        model: the network being trained; its trainable parameters are logged and checkpointed.
        optimizer: its learning rate is logged and its state checkpointed (None: neither).
        model_spec: the JSON spec that rebuilds the model (``lossatlas.models``), stored in the file.
        data_spec: the JSON spec that rebuilds the data set, stored in the file.
        loss: the loss name (``lossatlas.losses``) the probes evaluate by default.
        checkpoint_every: checkpoint every k steps.
        checkpoint_steps: checkpoint at exactly these steps.
        log_spaced: checkpoint at this many log-spaced steps in [1, ``max_steps``], plus step 0.
        max_steps: the last training step (needed by ``log_spaced``).
        telemetry: log the global and per-tensor gradient norm, weight norm and update ratio.
        per_tensor: with ``telemetry``, also one column per parameter tensor.
        save_optimizer_state: store the optimizer state in each checkpoint.
        overwrite: replace an existing file at ``path``.
        attrs: extra file attributes (JSON-able).
        instability: also log the ``InstabilityMonitor`` statistics (attention and output logits,
            activations, Adam second moments).
        groups: the data-group names passed as ``group_losses`` to ``step`` (with ``instability``).
        attention_heads: also log the per-head maximum attention logit and attention entropy
            (``attn_max_logit/layer<i>/head<h>``, ``attn_entropy/layer<i>/head<h>``;
            ``lossatlas.telemetry.AttentionHeadMonitor``) of the reference GPT or Hugging Face attention.
    """

    def __init__(self, path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 model_spec: Mapping | None = None, data_spec: Mapping | None = None, loss: str | None = None,
                 checkpoint_every: int | None = None, checkpoint_steps: Iterable[int] | None = None,
                 log_spaced: int | None = None, max_steps: int | None = None, telemetry: bool = True,
                 per_tensor: bool = True, save_optimizer_state: bool = True, overwrite: bool = False,
                 attrs: Mapping[str, Any] | None = None, instability: bool = False,
                 groups: Sequence[str] | None = None, attention_heads: bool = False) -> None:
        self.model = model
        self.optimizer = optimizer
        self.telemetry = telemetry
        self.per_tensor = per_tensor
        self.save_optimizer_state = save_optimizer_state
        self._every = checkpoint_every
        self._schedule = checkpoint_schedule(every=checkpoint_every, steps=checkpoint_steps,
                                             log_spaced=log_spaced, max_steps=max_steps)
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        self._keys_g = [f"grad_norm/{n}" for n in self._names]
        self._keys_w = [f"weight_norm/{n}" for n in self._names]
        self._keys_u = [f"update_ratio/{n}" for n in self._names]
        self._params = [p for _, p in model.named_parameters() if p.requires_grad]
        self._previous: list[torch.Tensor] | None = None
        self._tracker = norm_tracker(self._params) if telemetry else None  # None: the per-tensor loop below
        self._checkpointed: set[int] = set()
        self._steps: list[int] = []  # buffered log rows (written by _flush)
        self._rows: list[dict[str, float]] = []
        self._norms: list[torch.Tensor] = []
        self._flushed_at = time.monotonic()
        self._monitor = None
        if instability:  # attention-logit, output-logit, activation and Adam statistics (telemetry.py)
            from lossatlas.telemetry import InstabilityMonitor

            self._monitor = InstabilityMonitor(model, optimizer, groups=groups)
        self._heads = None
        if attention_heads:  # per-head max attention logit and entropy (telemetry.py)
            from lossatlas.telemetry import AttentionHeadMonitor

            self._heads = AttentionHeadMonitor(model)
        self._writer = store.RunWriter(
            path, model_spec=dict(model_spec) if model_spec is not None else None,
            data_spec=dict(data_spec) if data_spec is not None else None, loss=loss,
            optimizer=optimizer_spec(optimizer), attrs=dict(attrs or {}), overwrite=overwrite,
            log_names=self._known_log_names())  # created up front: no SWMR restart mid-run

    # -- the training-loop hooks ------------------------------------------------------------
    def step(self, step: int, loss: float | None = None, *, group_losses: Mapping[str, float] | None = None,
             **scalars: float) -> None:
        """Log telemetry for ``step`` (call after ``optimizer.step()``), and checkpoint on schedule.

        ``group_losses`` (name → loss on that data group) is logged as ``group_loss/<name>``. The
        norms stay on the device until the buffered rows are written (every ``FLUSH_EVERY`` steps or
        ``FLUSH_SECONDS``, at a checkpoint and at ``close``), so a step costs one C pass (CPU) or one
        fused copy and no host sync (accelerators).
        """
        step = int(step)
        row: dict[str, float] = {} if loss is None else {"loss": float(loss)}
        if self.optimizer is not None:
            lr = self.learning_rate()
            if lr is not None:
                row["lr"] = lr
        if self._monitor is not None:
            row.update(self._monitor.collect(group_losses=group_losses))
        elif group_losses:
            row.update({f"group_loss/{k}": float(v) for k, v in group_losses.items()})
        if self._heads is not None:
            row.update(self._heads.collect())
        for k, v in scalars.items():
            row[k] = float(v)
        self._steps.append(step)
        self._rows.append(row)
        if self._tracker is not None:
            self._tracker.push()
        elif self.telemetry:
            self._norms.append(self._telemetry())
        if len(self._steps) >= FLUSH_EVERY or time.monotonic() - self._flushed_at >= FLUSH_SECONDS:
            self._flush()
        if self._due(step):
            self.checkpoint(step, loss=loss)

    def checkpoint(self, step: int, **attrs: float | None) -> None:
        """Write a checkpoint of the model (and optimizer state) at ``step`` now."""
        if step in self._checkpointed:
            return
        self._flush()  # the log up to this checkpoint lands with it
        params = {n: p.detach().cpu() for n, p in self.model.named_parameters()}
        # persistent buffers only: exactly the state_dict entries that are not parameters
        buffers = {n: b.detach().cpu() for n, b in self.model.state_dict(keep_vars=True).items() if n not in params}
        opt_state = None
        if self.optimizer is not None and self.save_optimizer_state:
            opt_state = optimizer_state_by_name(self.model, self.optimizer) or None
        scalars = {k: float(v) for k, v in attrs.items() if v is not None}
        lr = self.learning_rate()
        if lr is not None:
            scalars.setdefault("lr", lr)
        self._writer.write_checkpoint(step, params, buffers, opt_state, scalars)
        self._checkpointed.add(step)

    def learning_rate(self) -> float | None:
        """The first parameter group's current learning rate."""
        if self.optimizer is None or not self.optimizer.param_groups:
            return None
        lr = self.optimizer.param_groups[0].get("lr")
        return float(lr) if lr is not None else None

    def close(self) -> None:
        """Flush the log and close the run file (idempotent)."""
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        if self._heads is not None:
            self._heads.close()
            self._heads = None
        if self._writer is not None:
            self._flush()
            self._writer.close()
            self._writer = None  # type: ignore[assignment]

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------
    def _known_log_names(self) -> list[str]:
        names = ["loss", "lr"]
        if self.telemetry:
            names += ["grad_norm", "weight_norm", "update_ratio"]
            if self.per_tensor:
                for n in self._names:
                    names += [f"grad_norm/{n}", f"weight_norm/{n}", f"update_ratio/{n}"]
        if self._heads is not None:
            names += self._heads.names()
        return names

    def _due(self, step: int) -> bool:
        if self._schedule is None:
            return step % int(self._every) == 0  # type: ignore[arg-type]
        return step in self._schedule

    @torch.no_grad()
    def _telemetry(self) -> torch.Tensor:
        """(3n,) norms ‖g_i‖, ‖w_i‖, ‖w_i − w_i,prev‖ by a per-tensor loop (parameters on several devices)."""
        params = self._params
        grads = [p.grad if p.grad is not None else torch.zeros((), device=p.device) for p in params]
        if self._previous is None:
            self._previous = [p.detach().clone() for p in params]
            diffs = [torch.full((), float("nan"), device=p.device) for p in params]
        else:
            diffs = [p - q for p, q in zip(params, self._previous)]
            for q, p in zip(self._previous, params):
                q.copy_(p)
        home = params[0].device  # each norm on its tensor's device, gathered on one
        return torch.stack([torch.linalg.vector_norm(t).to(home) for t in (*grads, *params, *diffs)])

    def _flush(self) -> None:
        """Write the buffered rows: one host transfer for all norms, then columns in bulk."""
        if not self._steps:
            return
        steps, rows, norms = self._steps, self._rows, self._norms
        self._flushed_at = time.monotonic()
        self._steps, self._rows, self._norms = [], [], []
        names = list(dict.fromkeys(k for row in rows for k in row))
        cols = {k: np.array([row.get(k, np.nan) for row in rows], dtype=np.float64) for k in names}
        n = len(self._names)
        block = self._tracker.drain() if self._tracker is not None else (torch.stack(norms) if norms else None)
        if block is not None:
            arr = block.reshape(len(steps), 3 * n).double().cpu().numpy()  # (T, 3n): g, w, update
            g, w, u = arr[:, :n], arr[:, n : 2 * n], arr[:, 2 * n :]
            wn = np.sqrt((w**2).sum(axis=1))
            cols["grad_norm"] = np.sqrt((g**2).sum(axis=1))
            cols["weight_norm"] = wn
            cols["update_ratio"] = np.sqrt((u**2).sum(axis=1)) / np.maximum(wn, 1e-30)
            if self.per_tensor:
                for i in range(n):
                    cols[self._keys_g[i]] = g[:, i]
                    cols[self._keys_w[i]] = w[:, i]
                    cols[self._keys_u[i]] = u[:, i] / np.maximum(w[:, i], 1e-30)
        self._writer.log_block(steps, cols)
