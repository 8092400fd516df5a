"""Turn what a user has into a fixed list of (inputs, targets) batches, and fingerprint it.

Accepted: an ``(inputs, targets)`` pair of tensors, a ``torch.utils.data.Dataset``
of pairs or of dicts, or an iterable of ``(inputs, targets)`` batches or of dict batches
(a DataLoader, a list).

A dict batch (``input_ids``, ``attention_mask``, ``labels``, ``pixel_values``, ...) becomes the
pair (the dict without ``labels``, ``labels``): the model is called as ``model(**inputs)`` and
does not compute its own loss. Where ``labels`` have the shape of ``attention_mask``, the masked
positions get the label -100 (ignored, as Hugging Face's collators do). A batch's example count is
the leading dimension of its inputs.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

Inputs = Tensor | dict[str, Tensor]
Batch = tuple[Inputs, Tensor]
IGNORE_INDEX = -100  # the label of a position no loss counts


def from_dict(batch: Mapping[str, Any]) -> Batch:
    """(inputs without ``labels``, labels) from a dict batch; masked positions get the label -100."""
    if "labels" not in batch:
        raise ValueError(
            f"a dict batch needs 'labels' (it has {', '.join(sorted(map(str, batch)))}); "
            "for a causal language model add labels = input_ids"
        )
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    y = torch.as_tensor(batch["labels"])
    mask = inputs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.shape == y.shape and not y.is_floating_point():
        y = y.masked_fill(mask == 0, IGNORE_INDEX)
    return inputs, y


def batch_length(x: Inputs) -> int:
    """The examples in a batch's inputs: their leading dimension (of the first tensor of a dict)."""
    if isinstance(x, Mapping):
        for v in x.values():
            if isinstance(v, Tensor) and v.ndim:
                return int(v.shape[0])
        return 0
    return int(x.shape[0])


def map_inputs(fn, x: Inputs) -> Inputs:
    """``fn`` applied to the inputs tensor, or to every tensor of a dict (other values kept)."""
    if isinstance(x, Mapping):
        return {k: fn(v) if isinstance(v, Tensor) else v for k, v in x.items()}
    return fn(x)


def cat_inputs(a: Inputs, b: Inputs) -> Inputs:
    """Two batches' inputs concatenated along the examples."""
    if isinstance(a, Mapping):
        return {k: torch.cat([v, b[k]]) if isinstance(v, Tensor) else v for k, v in a.items()}
    return torch.cat([a, b])


def inputs_signature(x: Inputs) -> tuple:
    """Per-example shapes and dtypes: batches with equal signatures can be concatenated."""
    if isinstance(x, Mapping):
        return tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in x.items() if isinstance(v, Tensor))
    return (tuple(x.shape[1:]), x.dtype)


def _collate(items: Sequence[Any]) -> Any:
    """Stack a list of tensors (or arrays/numbers) along a new leading dimension."""
    if isinstance(items[0], Tensor):
        return torch.stack(list(items))
    return torch.as_tensor(np.stack([np.asarray(t) for t in items]))


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
        items = [data[i] for i in range(n)]
        if items and isinstance(items[0], Mapping):
            size = n if batch_size is None else int(batch_size)
            if size <= 0:
                raise ValueError(f"batch_size must be positive, got {batch_size}")
            return [
                from_dict({k: _collate([it[k] for it in items[i : i + size]]) for k in items[0]})
                for i in range(0, n, size)
            ]
        xs, ys = zip(*items)
        return as_batches((torch.stack(list(xs)), torch.as_tensor(np.stack([np.asarray(t) for t in ys]))), batch_size)
    if isinstance(data, Iterable):
        out: list[Batch] = []
        seen = 0
        for batch in data:
            if isinstance(batch, Mapping):
                batch = from_dict(batch)
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise ValueError("each batch must be an (inputs, targets) pair or a dict with 'labels'")
            x, y = batch[0], batch[1]
            n = batch_length(x)
            if limit is not None and seen + n > limit:
                n = limit - seen
                x, y = map_inputs(lambda t, n=n: t[:n], x), y[:n]
            if n:
                out.append((x, y))
            seen += n
            if limit is not None and seen >= limit:
                break
        if not out:
            raise ValueError("the data holds no batches")
        return out
    raise ValueError(
        f"cannot use {type(data).__name__} as data: give an (inputs, targets) pair of tensors, "
        "a torch Dataset, or an iterable of (inputs, targets) batches or of dict batches with 'labels'"
    )


def num_examples(batches: Sequence[Batch]) -> int:
    """Total number of examples over the batches."""
    return sum(batch_length(x) for x, _ in batches)


def fingerprint(batches: Sequence[Batch]) -> str:
    """sha256 (16 hex digits) of the batches' shapes, dtypes and bytes, in order."""
    h = hashlib.sha256()
    for x, y in batches:
        named = list(x.items()) if isinstance(x, Mapping) else [(None, x)]
        for key, t in [*named, (None, y)]:
            if key is not None:
                h.update(f"{key}=".encode())
            t = t.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def to_device(batches: Sequence[Batch], device: torch.device | str, dtype: torch.dtype | None = None) -> list[Batch]:
    """Move batches to ``device``; cast floating inputs (and float targets) to ``dtype`` if given."""
    def move(t: Tensor) -> Tensor:
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    return [(map_inputs(move, x), move(y)) for x, y in batches]
