"""Temporarily set a module's train/eval flag and restore every submodule's flag afterwards."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, mode: str = "eval") -> Iterator[nn.Module]:
    """Run the block with ``model`` in ``mode`` ("eval" | "train"); restore each submodule's flag."""
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    flags = [(m, m.training) for m in model.modules()]
    model.train(mode == "train")
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
