"""Turn what a user has into a fixed list of (inputs, targets) batches, and fingerprint it.

Accepted: an ``(inputs, targets)`` pair of tensors, a ``torch.utils.data.Dataset``
of pairs, or an iterable of ``(inputs, targets)`` batches (a DataLoader, a list).
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

Batch = tuple[Tensor, Tensor]


def as_batches(data: Any, batch_size: int | None = None, *, limit: int | None = None) -> list[Batch]:
    """A fixed, ordered list of batches from a tensor pair, a Dataset or an iterable of batches.

    ``batch_size`` splits a tensor pair or a Dataset (None: one full batch); ``limit`` keeps the
    first ``limit`` examples. An iterable of batches is taken as it is (``limit`` still applies).
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"inputs and targets differ in length: {x.shape[0]} vs {y.shape[0]}")
        if limit is not None:
            x, y = x[:limit], y[:limit]
        n = x.shape[0]
        size = n if batch_size is None else int(batch_size)
        if size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        n = len(data) if limit is None else min(limit, len(data))
        xs, ys = zip(*(data[i] for i in range(n)))
        return as_batches((torch.stack(list(xs)), torch.as_tensor(np.stack([np.asarray(t) for t in ys]))), batch_size)
    if isinstance(data, Iterable):
        out: list[Batch] = []
        seen = 0
        for batch in data:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise ValueError("each batch must be an (inputs, targets) pair")
            x, y = batch[0], batch[1]
            if limit is not None and seen + x.shape[0] > limit:
                x, y = x[: limit - seen], y[: limit - seen]
            if x.shape[0]:
                out.append((x, y))
            seen += x.shape[0]
            if limit is not None and seen >= limit:
                break
        if not out:
            raise ValueError("the data holds no batches")
        return out
    raise ValueError(
        f"cannot use {type(data).__name__} as data: give an (inputs, targets) pair of tensors, "
        "a torch Dataset, or an iterable of (inputs, targets) batches"
    )


def num_examples(batches: Sequence[Batch]) -> int:
    """Total number of examples over the batches."""
    return sum(int(x.shape[0]) for x, _ in batches)


def fingerprint(batches: Sequence[Batch]) -> str:
    """sha256 (16 hex digits) of the batches' shapes, dtypes and bytes, in order."""
    h = hashlib.sha256()
    for x, y in batches:
        for t in (x, y):
            t = t.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def to_device(batches: Sequence[Batch], device: torch.device | str, dtype: torch.dtype | None = None) -> list[Batch]:
    """Move batches to ``device``; cast floating inputs (and float targets) to ``dtype`` if given."""
    out = []
    for x, y in batches:
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        if dtype is not None and y.is_floating_point():
            y = y.to(dtype)
        out.append((x.to(device), y.to(device)))
    return out
