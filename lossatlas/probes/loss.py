"""The ``loss`` probe: loss and accuracy of a checkpoint on a data set.

The cheapest probe, and the runner's end-to-end proof.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from lossatlas._moved import renamed
from lossatlas.losses import accuracy_available, batch_count, check_loss_name, correct_count, data_loss
from lossatlas.outputs import model_outputs
from lossatlas.probes.base import Probe, ProbeContext, Result, register_probe
from lossatlas.probes.modes import evaluation_mode
from lossatlas.probes.settings import MODES, check_choice


def evaluate_loss(model: torch.nn.Module, batches, loss: str, *, mode: str = "eval") -> tuple[float, float, int]:
    """Example-weighted mean loss L = Σ_b (n_b/N) L_b, accuracy in [0, 1], and N.

    The model's train/eval flag is set to ``mode`` for the evaluation and restored afterwards. The
    accuracy is NaN under the loss "model", whose outputs are the loss, not predictions.
    """
    batches = list(batches)
    from lossatlas import losses as _losses

    if _losses.is_closure(loss):  # a loss_fn(model, batch) closure: Σ_b n_b L_b / Σ_b n_b, no predictions
        with evaluation_mode(model, mode), torch.enable_grad():  # it may differentiate through its inputs
            pairs = [_losses.closure_value(loss, model, None, b) for b in batches]  # type: ignore[arg-type]
        total = sum(n for _, n in pairs)
        return float(sum(float(v.detach()) * n for v, n in pairs) / max(total, 1)), float("nan"), total
    correct = [0]
    scored = accuracy_available(loss)

    def count_correct(out: torch.Tensor, y: torch.Tensor) -> None:
        if scored:
            correct[0] += correct_count(out, y, loss)

    with torch.no_grad(), evaluation_mode(model, mode):
        value = data_loss(loss, lambda x: model_outputs(model, x), batches, on_outputs=count_correct)
    count = sum(batch_count(loss, y) for _, y in batches)
    return float(value), (correct[0] / count if scored else float("nan")), count


@register_probe
@dataclass(frozen=True, kw_only=True)
class Loss(Probe):
    """Loss L = Σ_b (n_b/N) L_b and accuracy of the checkpoint on the data set (eval mode by default)."""

    name: ClassVar[str] = "loss"
    summary: ClassVar[str] = "loss and accuracy on a data set"
    section: ClassVar[str] = "overview"
    figure: ClassVar[str | None] = "loss"
    mode: str = "eval"

    def validate(self) -> None:
        """ValueError for a ``mode`` other than "eval" or "train"."""
        check_choice("mode", self.mode, MODES)

    def run(self, ctx: ProbeContext) -> Result:
        """``loss`` L = Σ_b (n_b/N) L_b and ``accuracy`` (correct / N) over every batch, without gradients.

        ValueError for an unknown loss name in the context.
        """
        check_loss_name(ctx.loss)
        start = time.perf_counter()
        loss, acc, n = evaluate_loss(ctx.model, ctx.data, ctx.loss, mode=self.mode)
        res = self.new_result(ctx.step, {"num_examples": n, "loss_name": ctx.loss, "finite": bool(np.isfinite(loss)),
                                         "elapsed_s": time.perf_counter() - start})
        return res.add("loss", np.float64(loss)).add("accuracy", np.float64(acc))


def __getattr__(name: str):
    return renamed(__name__, name)  # the probe class's old name, with a DeprecationWarning
