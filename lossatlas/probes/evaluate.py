"""Loss and accuracy of a checkpoint on a data set: the cheapest probe, and the runner's end-to-end proof."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from lossatlas.probes.base import Probe, ProbeContext, Result, register_probe
from lossatlas.probes.losses import batch_count, batch_loss, check_loss_name, correct_count
from lossatlas.probes.modes import evaluation_mode


def evaluate_loss(model: torch.nn.Module, batches, loss: str, *, mode: str = "eval") -> tuple[float, float, int]:
    """Example-weighted mean loss L = Σ_b (n_b/N) L_b, accuracy in [0, 1], and N (SCIENCE.md §0).

    The model's train/eval flag is set to ``mode`` for the evaluation and restored afterwards.
    """
    total, correct, count = 0.0, 0, 0
    with torch.no_grad(), evaluation_mode(model, mode):
        for x, y in batches:
            out = model(x)
            n = batch_count(loss, y)
            total += float(batch_loss(loss, out, y)) * n
            correct += correct_count(out, y)
            count += n
    return total / count, correct / count, count


@register_probe
@dataclass(frozen=True, kw_only=True)
class LossAccuracy(Probe):
    """Loss L = Σ_b (n_b/N) L_b and accuracy of the checkpoint on the data set (eval mode by default)."""

    name: ClassVar[str] = "loss"
    summary: ClassVar[str] = "loss and accuracy on a data set"
    mode: str = "eval"

    def validate(self) -> None:
        if self.mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {self.mode!r}")

    def run(self, ctx: ProbeContext) -> Result:
        check_loss_name(ctx.loss)
        start = time.perf_counter()
        loss, acc, n = evaluate_loss(ctx.model, ctx.data, ctx.loss, mode=self.mode)
        return Result(
            probe=self.name,
            config=self.config(),
            step=ctx.step,
            values={"loss": np.float64(loss), "accuracy": np.float64(acc)},
            dims={"loss": (), "accuracy": ()},
            meta={"num_examples": n, "loss_name": ctx.loss, "finite": bool(np.isfinite(loss)),
                  "elapsed_s": time.perf_counter() - start},
        )
