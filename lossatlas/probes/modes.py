"""Temporarily set a module's train/eval flag and restore every submodule's flag afterwards."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from lossatlas.checks import check_choice


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, mode: str = "eval", *, cumulative_bn: bool = False) -> Iterator[nn.Module]:
    """Run the block with ``model`` in ``mode`` ("eval" | "train"); restore each submodule's flag.

    ``cumulative_bn`` also sets every BatchNorm's momentum to None for the block (running statistics
    become the plain average over the batches seen, as when recomputing them at a new point).
    """
    check_choice("mode", mode, ("eval", "train"))
    saved = [(m, m.training, getattr(m, "momentum", None)) for m in model.modules()]
    try:
        model.train(mode == "train")
        if cumulative_bn:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = None
        yield model
    finally:
        for m, flag, momentum in saved:
            m.training = flag
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = momentum
