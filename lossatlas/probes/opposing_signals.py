"""The ``opposing_signals`` probe: paired groups of training examples whose losses oscillate in opposition.

Rosenfeld & Risteski 2023, "Outliers with Opposing Signals Have an Outsized Effect on Neural Network
Optimization" (arXiv 2311.04163): a few training examples carry large, consistent features ("opposing signals",
e.g. sky in images of planes and of other classes) whose gradients point in opposite directions; training enters a
narrow valley that balances the two groups, sharpens, and the groups' losses then oscillate, one high while the
other is low. The paper finds them by the examples with the largest loss changes between consecutive steps and
groups them.

Across the checkpoints t_0 < … < t_T of a run (every stored step up to the probe's step, or ``steps``):

    ℓ_i(t)           the loss of training example i at checkpoint t (the model in ``mode``);
    Δ_i(t)           = ℓ_i(t_{s+1}) − ℓ_i(t_s), s = 0 … T − 1;
    Δ̃_i(t_s)         = Δ_i(t_s) − (1/T) Σ_s Δ_i(t_s): the change without the example's mean drift (a loss that
                     falls steadily is not an oscillation; the common descent of every loss would otherwise
                     dominate the grouping);
    m_i              = Σ_s |Δ̃_i(t_s)|: the example's oscillating loss movement;
    selected         the ``top_k`` examples with the largest m_i (ties by index);
    groups           the signs of the leading left singular vector u of the k×T matrix D_{j,s} = Δ̃_{i_j}(t_s):
                     A = {u_j > 0}, B = {u_j < 0}, oriented so that the example with the largest m_i is in A.
                     Two groups whose changes are exactly opposite (Δ = a rᵀ with sign(a) = ±1 per group, r not
                     constant) are recovered exactly; examples with u_j = 0 join neither;
    change_correlation  Pearson correlation over s of the groups' mean changes ā(s) = mean_{i∈A} Δ_i(t_s),
                     b̄(s) (−1: perfect opposition; needs T ≥ 2);
    gradient_cosine  at each checkpoint, cos(∇L_A, ∇L_B) of the gradients of the groups' mean losses
                     (negative: the groups pull the parameters in opposite directions).

``opposing`` = 1 when change_correlation < 0 and the mean gradient cosine < 0. Defaults: top_k = 20, every
checkpoint up to the probe's step, the model's eval mode.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lossatlas.losses import per_example_loss
from lossatlas.outputs import model_outputs
from lossatlas.probes.base import Probe, ProbeContext, Result, register_probe
from lossatlas.probes.settings import MODES, check_choice


def _take(x: Any, rows: Tensor) -> Any:
    """The rows ``rows`` of a batch input (a tensor, or a dict of tensors such as Hugging Face inputs)."""
    if isinstance(x, dict):
        return {k: v[rows] for k, v in x.items()}
    return x[rows]


def per_example_losses(model: nn.Module, data: Sequence[tuple[Any, Tensor]], loss: str) -> np.ndarray:
    """ℓ_i for every example of ``data`` in order (float64, shape (N,)); no gradients."""
    out = []
    with torch.no_grad():
        for x, y in data:
            out.append(per_example_loss(loss, model_outputs(model, x), y).detach().to(torch.float64).cpu())
    return torch.cat(out).numpy()


def group_gradient(model: nn.Module, data: Sequence[tuple[Any, Tensor]], loss: str, members: np.ndarray) -> Tensor:
    """∇_θ of the mean loss over the examples ``members`` (global indices in ``data``'s order), flat float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    grad = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    wanted = set(int(i) for i in members)
    start = 0
    for x, y in data:
        tokens = loss == "causal_lm"  # its terms are the batch's B·(T−1) next tokens, not its rows
        n = int(y.shape[0] * (y.shape[1] - 1)) if tokens else int(y.shape[0])
        rows = [i - start for i in range(start, start + n) if i in wanted]
        start += n
        if not rows:
            continue
        idx = torch.as_tensor(rows, dtype=torch.long)
        if tokens:  # the whole batch is scored; the wanted tokens' terms are summed
            total = per_example_loss(loss, model_outputs(model, x), y)[idx].sum() / len(wanted)
        else:
            total = per_example_loss(loss, model_outputs(model, _take(x, idx)), y[idx]).sum() / len(wanted)
        gs = torch.autograd.grad(total, params, allow_unused=True)
        grad += torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).to(torch.float64)
                           for p, g in zip(params, gs)])
    return grad


def opposing_groups(changes: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(selected example indices, group ±1/0 of each) from the (T, N) loss changes (module docstring)."""
    D = np.asarray(changes, dtype=np.float64)
    D = D - D.mean(axis=0, keepdims=True)  # each example's mean drift removed: oscillation, not descent
    movement = np.abs(D).sum(axis=0)
    order = np.lexsort((np.arange(movement.size), -movement))  # largest movement first, ties by index
    sel = order[: min(top_k, movement.size)]
    U, _, _ = np.linalg.svd(D[:, sel].T, full_matrices=False)
    u = U[:, 0]
    scale = np.abs(u).max()
    sign = np.where(u > 1e-12 * scale, 1, np.where(u < -1e-12 * scale, -1, 0)) if scale > 0 else np.zeros_like(sel)
    if sign[0] < 0:  # the example with the largest movement leads group A
        sign = -sign
    return sel, sign.astype(np.int64)


@register_probe
@dataclass(frozen=True, kw_only=True)
class OpposingSignals(Probe):
    """Paired groups of examples whose losses move in opposition with opposing gradients (Rosenfeld & Risteski 2023).

    See the module docstring for the selection, the grouping and the two tests (loss-change correlation, gradient
    cosine).

    Attributes:
        top_k: the number of examples with the largest total loss movement that are grouped (20).
        steps: the checkpoints to use (None: every stored step up to the probe's step; at least 3).
        mode: the model's "eval" (default) or "train" flag while losses and gradients are evaluated.
    Values: "examples" ("example",) global indices, "group" ("example",) +1 (A) / −1 (B) / 0, "loss_trace"
        ("example", "checkpoint"), "group_loss" ("side", "checkpoint"; side A, B), "movement" ("example",),
        "gradient_cosine" ("checkpoint",), scalars "change_correlation", "mean_gradient_cosine", "num_a", "num_b",
        "opposing" (0/1).
    """

    name: ClassVar[str] = "opposing_signals"
    summary: ClassVar[str] = "paired example groups whose losses oscillate in opposition, with opposing gradients"
    section: ClassVar[str] = "overview"
    title: ClassVar[str] = "Opposing signals"
    figure: ClassVar[str | None] = None
    usage: ClassVar[str] = "--step last"

    top_k: int = 20
    steps: tuple[int, ...] | None = None
    mode: str = "eval"

    def validate(self) -> None:
        """ValueError for a setting out of range."""
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 2:
            raise ValueError(f"{self.name}: top_k must be an integer >= 2 (two groups), got {self.top_k!r}")
        if self.steps is not None and (len(self.steps) < 3 or any(int(s) < 0 for s in self.steps)):
            raise ValueError(f"{self.name}: steps must list at least 3 checkpoint steps >= 0, got {self.steps!r}")
        check_choice("mode", self.mode, MODES, prefix=f"{self.name}: ")

    def _steps(self, ctx: ProbeContext) -> list[int]:
        if ctx.state_at is None or not ctx.steps:
            raise ValueError("opposing_signals needs the run's checkpoints (ctx.steps, ctx.state_at); run it on a run file")
        if self.steps is not None:
            missing = sorted(set(int(s) for s in self.steps) - set(int(s) for s in ctx.steps))
            if missing:
                raise ValueError(f"opposing_signals: step(s) {missing} are not checkpoints of the run; pick from "
                                 f"{sorted(ctx.steps)[:10]}")
            steps = sorted(set(int(s) for s in self.steps))
        else:
            last = int(ctx.step) if ctx.step is not None else max(ctx.steps)
            steps = sorted(int(s) for s in ctx.steps if int(s) <= last)
        if len(steps) < 3:
            raise ValueError(f"opposing_signals needs at least 3 checkpoints (loss changes to correlate), got "
                             f"{len(steps)}; record more checkpoints")
        return steps

    def run(self, ctx: ProbeContext) -> Result:
        """Per-checkpoint losses, the groups, their loss traces, change correlation and gradient cosines."""
        t0 = time.perf_counter()
        steps = self._steps(ctx)
        data = list(ctx.data)
        model = copy.deepcopy(ctx.model)  # the user's model keeps its weights and flags
        model.train(self.mode == "train")
        known = set(model.state_dict())
        states = []
        losses = []
        for s in steps:
            state = {k: v for k, v in ctx.state_at(s).items() if k in known}
            states.append(state)
            model.load_state_dict(state, strict=False)
            losses.append(per_example_losses(model, data, ctx.loss))
        L = np.stack(losses)  # (T + 1, N)
        changes = np.diff(L, axis=0)
        sel, sign = opposing_groups(changes, self.top_k)
        A, B = sel[sign > 0], sel[sign < 0]
        a_change = changes[:, A].mean(axis=1) if A.size else np.full(changes.shape[0], np.nan)
        b_change = changes[:, B].mean(axis=1) if B.size else np.full(changes.shape[0], np.nan)
        if A.size and B.size and changes.shape[0] >= 2 and a_change.std() > 0 and b_change.std() > 0:
            corr = float(np.corrcoef(a_change, b_change)[0, 1])
        else:
            corr = float("nan")
        cosines = np.full(len(steps), np.nan)
        if A.size and B.size:
            for j, state in enumerate(states):
                model.load_state_dict(state, strict=False)
                ga = group_gradient(model, data, ctx.loss, A)
                gb = group_gradient(model, data, ctx.loss, B)
                denom = float(ga.norm() * gb.norm())
                cosines[j] = float(ga @ gb) / denom if denom > 0 else np.nan
        mean_cos = float(np.nanmean(cosines)) if np.isfinite(cosines).any() else float("nan")
        group_loss = np.stack([L[:, A].mean(axis=1) if A.size else np.full(len(steps), np.nan),
                               L[:, B].mean(axis=1) if B.size else np.full(len(steps), np.nan)])
        res = self.new_result(steps[-1] if ctx.step is None else ctx.step)
        res.add("examples", sel.astype(np.int64), ("example",))
        res.add("group", sign, ("example",))
        res.add("movement", np.abs(changes[:, sel]).sum(axis=0), ("example",))
        res.add("loss_trace", L[:, sel].T.copy(), ("example", "checkpoint"), {"checkpoint": np.asarray(steps)})
        res.add("group_loss", group_loss, ("side", "checkpoint"), {"side": np.asarray(["A", "B"], dtype=str)})
        res.add("gradient_cosine", cosines, ("checkpoint",))
        res.add("change_correlation", np.float64(corr))
        res.add("mean_gradient_cosine", np.float64(mean_cos))
        res.add("num_a", np.int64(A.size))
        res.add("num_b", np.int64(B.size))
        res.add("opposing", np.int64(bool(corr < 0 and mean_cos < 0)))
        res.meta.update(num_examples=int(L.shape[1]), elapsed_s={"opposing_signals": time.perf_counter() - t0})
        return res


def opposing_signals(model: nn.Module, data: Any, states: Sequence[dict], loss: str = "cross_entropy",
                     **settings: Any) -> Result:
    """Run the probe in a notebook on a list of state_dicts (checkpoints 0, 1, …): ``.values["group"]``."""
    from lossatlas.batches import as_batches

    steps = list(range(len(states)))
    ctx = ProbeContext(model=model, data=as_batches(data), loss=loss, step=steps[-1], steps=steps,
                       state_at=lambda s: states[s])
    return OpposingSignals(**settings).run(ctx)


__all__ = ["OpposingSignals", "group_gradient", "opposing_groups", "opposing_signals", "per_example_losses"]
