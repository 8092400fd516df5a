"""Turn what a user has into a fixed list of (inputs, targets) batches, and fingerprint it.

Accepted: an ``(inputs, targets)`` pair of tensors, a ``torch.utils.data.Dataset``
of pairs or of dicts, or an iterable of ``(inputs, targets)`` batches or of dict batches
(a DataLoader, a list).

A dict batch (``input_ids``, ``attention_mask``, ``labels``, ``pixel_values``, ...) becomes the
pair (the dict without ``labels``, ``labels``): the model is called as ``model(**inputs)`` and
does not compute its own loss. Where ``labels`` have the shape of ``attention_mask``, the masked
positions get the label -100 (ignored, as Hugging Face's collators do). With ``keep_labels=True``
(the loss ``"model"``: the model's own ``outputs.loss``) the inputs keep those labels, so that
``model(**inputs)`` computes its loss on exactly the counted positions. A single dict batch is
data too (split into ``batch_size`` rows). A batch's example count is the leading dimension of its
inputs.

Examples of unequal shapes (sequences of other lengths) are never padded: ``take`` regroups any
selection of examples into one batch per shape, so every loss, weighted by its counted terms, is
unchanged.
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


def from_dict(batch: Mapping[str, Any], *, keep_labels: bool = False) -> Batch:
    """(inputs without ``labels``, labels) from a dict batch; masked positions get the label -100.

    ``keep_labels``: the inputs keep ``labels`` (with the -100 of the masked positions), for a model that
    computes its own loss.
    """
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
    if keep_labels:
        inputs["labels"] = y
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


def as_batches(data: Any, batch_size: int | None = None, *, limit: int | None = None,
               keep_labels: bool = False) -> list[Batch]:
    """A fixed, ordered list of batches from a tensor pair, a dict batch, a Dataset or an iterable of batches.

    ``batch_size`` splits a tensor pair, a single dict batch or a Dataset (None: one full batch);
    ``limit`` keeps the first ``limit`` examples. An iterable of batches is taken as it is (``limit``
    still applies). ``keep_labels``: dict batches keep ``labels`` in their inputs (``from_dict``).
    """
    if isinstance(data, Mapping):  # one dict batch: its rows, split like a tensor pair
        x, y = from_dict(data, keep_labels=keep_labels)
        n = batch_length(x) if limit is None else min(limit, batch_length(x))
        size = n if batch_size is None else int(batch_size)
        if size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if n == 0:
            raise ValueError("the data holds no batches")
        return [(map_inputs(lambda t, i=i: t[i : min(i + size, n)], x), y[i : min(i + size, n)])
                for i in range(0, n, size)]
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
                from_dict({k: _collate([it[k] for it in items[i : i + size]]) for k in items[0]},
                          keep_labels=keep_labels)
                for i in range(0, n, size)
            ]
        xs, ys = zip(*items)
        return as_batches((torch.stack(list(xs)), torch.as_tensor(np.stack([np.asarray(t) for t in ys]))), batch_size)
    if isinstance(data, Iterable):
        out: list[Batch] = []
        seen = 0
        for batch in data:
            if isinstance(batch, Mapping):
                batch = from_dict(batch, keep_labels=keep_labels)
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


def _signature(batch: Batch) -> tuple:
    """What must agree for two batches' examples to share a batch: inputs' and targets' per-example shapes."""
    x, y = batch
    return (inputs_signature(x), tuple(y.shape[1:]), y.dtype)


def take(batches: Sequence[Batch], index: Sequence[int] | Tensor) -> list[Batch]:
    """The examples at ``index`` (positions in the concatenation of ``batches``, repeats allowed), in that order.

    One batch when every batch's examples share their shapes (then it equals concatenating all and
    indexing); otherwise one batch per shape (sequences of one length each), in the order each shape
    first occurs in ``index``, with the examples in ``index`` order within it. No example is padded,
    so the mean of any loss over counted terms is unchanged. An empty ``index`` gives no batch.
    """
    index = torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu()
    if index.numel() == 0:
        return []
    sigs = [_signature(b) for b in batches]
    if all(s == sigs[0] for s in sigs):  # one shape: concatenate once and index (the common case)
        x = batches[0][0]
        for bx, _ in batches[1:]:
            x = cat_inputs(x, bx)
        y = torch.cat([b[1] for b in batches])
        return [(map_inputs(lambda t: t[index.to(t.device)], x), y[index.to(y.device)])]
    offsets = np.cumsum([0] + [batch_length(b[0]) for b in batches])
    which = np.searchsorted(offsets, index.numpy(), side="right") - 1  # the batch of every selected example
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for g, b in zip(index.tolist(), which.tolist()):
        groups.setdefault(sigs[b], []).append((b, g - int(offsets[b])))
    out: list[Batch] = []
    for members in groups.values():
        xs = [map_inputs(lambda t, b=b, i=i: t[i : i + 1], batches[b][0]) for b, i in members]
        x = xs[0]
        for xi in xs[1:]:
            x = cat_inputs(x, xi)
        out.append((x, torch.cat([batches[b][1][i : i + 1] for b, i in members])))
    return out


def split(batch: Batch, size: int) -> list[Batch]:
    """A batch cut into consecutive batches of at most ``size`` examples."""
    x, y = batch
    n = batch_length(x)
    return [(map_inputs(lambda t, i=i: t[i : i + size], x), y[i : i + size]) for i in range(0, n, int(size))]


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
