"""Data the way Hugging Face and nanoGPT users keep it: local files, read as data, nothing downloaded.

Three spec kinds, each a dict of options under its own key (beside the optional top-level ``seed``)::

    {"tokens": {"path": "train.bin", "block_size": 64, "dtype": "uint16", "max_examples": 256}, "seed": 0}
    {"hf_dataset": {"path": "ds_dir", "tokenizer": "tok_dir", "text_column": "text", "max_length": 128}}
    {"image_folder": {"path": "imgs/", "max_examples": 512}}

They sit beside ``name``/``factory``/``hf``/``timm``/``torchvision`` in
:mod:`lossatlas.models.registry` (exactly one per spec) and build data only. ``seed`` (int ≥ 0,
default 0) may be given at the top or inside the options; the canonical spec holds it at the top
and every option with its default filled in, so a spec that spells a default out and one that
leaves it out have the same fingerprint. ``kwargs`` are refused: the options are the dict.

Paths: a relative path is resolved against the current directory when the data is built (the
stored spec keeps it as written); ``~`` is expanded. A missing path is one UserError line naming it.

Nothing read from a file is executed: ``.bin`` streams are raw integers (``np.memmap``), ``.npy``
arrays are loaded with ``allow_pickle=False``, ``.pt`` tensors with ``torch.load(weights_only=True)``,
``save_to_disk`` folders are Arrow tables, a tokenizer folder is loaded with ``local_files_only=True``
and never ``trust_remote_code``. So these specs, like registered names, never need ``--trust-factory``.

**tokens** — a nanoGPT ``.bin`` file (Karpathy 2022, "nanoGPT", github.com/karpathy/nanoGPT,
``train.py::get_batch``): a flat little-endian ``dtype`` array (``uint16``, default, or ``uint32``)
of length M, read by memmap. A window is the w = block_size + 1 tokens ``data[i : i + block_size + 1]``. ``sampling="random"``
(default) draws the offsets exactly as nanoGPT does, ``i ~ randint(M − block_size, (n,))``, from a
``torch.Generator`` seeded with ``seed`` (so offsets equal nanoGPT's under ``torch.manual_seed(seed)``);
``sampling="sequential"`` takes i = 0, block_size, 2·block_size, … (windows overlap by one token, so
every token after the first is predicted once). ``layout`` maps a window onto our losses:

- ``"causal_lm"`` (default): a Dataset of dicts ``{"input_ids": w, "labels": w}`` (block_size + 1
  tokens each) for ``--loss causal_lm``, which scores logits[:, :-1] against labels[:, 1:]: the same
  block_size next-token terms as nanoGPT's loss. The model sees block_size + 1 positions (a GPT-2
  needs ``n_positions`` ≥ block_size + 1) and is called as ``model(input_ids=...)``.
- ``"pair"``: nanoGPT's own ``(x, y)`` = (data[i : i + block_size], data[i + 1 : i + 1 + block_size]),
  (N, block_size) each, for ``--loss cross_entropy`` on (B, T, V) logits; the model is called ``model(x)``.

n, the number of windows: ``max_examples``, else ``max_tokens // block_size`` (``max_tokens`` counts
the predicted tokens, block_size per window), the smaller when both are given; with neither, the
(M − 1) // block_size windows that tile the stream (refused above 2²⁴ tokens: give a limit).
``sequential`` never takes more windows than tile the stream.

**hf_dataset** — a ``datasets`` Dataset (or a DatasetDict with ``split``) saved with
``save_to_disk`` (Lhoest et al. 2021, "Datasets: A Community Library for Natural Language
Processing"). Inputs are, in this order of preference: a raw ``text_column`` (default "text" when
present and there is no ``input_ids``) tokenized by the ``tokenizer`` folder
(``AutoTokenizer.from_pretrained(dir, local_files_only=True)``), an ``input_ids`` column (with
``attention_mask`` and ``labels`` if present), or images (``image_column``, default "pixel_values"
then "image": arrays, or PIL images scaled to [0, 1] as channels-first float32). ``task``:
``"auto"`` (default) is classification when ``label_column`` (default "label") exists, else causal
LM. Sequences are truncated to ``max_length`` and right-padded (the tokenizer's side when one is
given) to the longest kept sequence, or to ``max_length`` with ``padding="max_length"``; the pad id
is the tokenizer's (its EOS when it has no pad token, as for GPT-2), else 0. Padding gets
attention_mask 0 and, for causal LM, label −100. Returns a Dataset of dicts
(``input_ids``/``attention_mask``/``labels`` or ``pixel_values``/``labels``).
``max_tokens`` bounds the non-padding input tokens Σ attention_mask.

**image_folder** — torchvision's ImageFolder layout (Marcel & Rodriguez 2010, "Torchvision the
machine-vision package of torch"): ``path/<class>/<file>``, classes the sorted
subfolder names (label = index), files in sorted order within each class; ``.pt`` tensors, ``.npy``
arrays, and ``.png``/``.jpg``/``.jpeg`` images through PIL (channels-first float32 in [0, 1], as
torchvision's ``ToTensor``); other files are ignored. Tensors and arrays keep their values (integer
ones become float32). Returns an ``(inputs, labels)`` pair.

**Subsets.** Without ``max_examples``/``max_tokens`` an hf_dataset or image_folder gives every
example in file order. With either, the examples come in the order of a permutation seeded by
``seed`` (``torch.randperm`` on a local generator) and the first ``max_examples`` are kept (then the
longest prefix within ``max_tokens``), so the subset is a fixed function of the seed, and a smaller
limit keeps a prefix of a larger one. The built object's ``describe()`` returns what was used:
kind, resolved path, seed, n_examples, n_tokens, the limits, and a sha256 of the window offsets or
example indices (see :func:`describe`).
"""

from __future__ import annotations

import hashlib
import os
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from lossatlas.errors import UserError

KINDS: tuple[str, ...] = ("tokens", "hf_dataset", "image_folder")
TOKEN_DTYPES: dict[str, str] = {"uint16": "<u2", "uint32": "<u4"}  # nanoGPT writes little-endian arrays
LAYOUTS: tuple[str, ...] = ("causal_lm", "pair")
SAMPLINGS: tuple[str, ...] = ("random", "sequential")
TASKS: tuple[str, ...] = ("auto", "causal_lm", "classification")
PADDINGS: tuple[str, ...] = ("longest", "max_length")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
FILE_SUFFIXES: tuple[str, ...] = (".pt", ".npy", *IMAGE_SUFFIXES)
MAX_DEFAULT_TOKENS = 2**24  # a stream longer than this needs an explicit max_examples / max_tokens
IGNORE_INDEX = -100  # the label of a position no loss counts (as lossatlas.losses)
_REQUIRED = object()

# every option of every kind with its default (_REQUIRED: must be given)
OPTIONS: dict[str, dict[str, Any]] = {
    "tokens": {"path": _REQUIRED, "block_size": _REQUIRED, "dtype": "uint16", "layout": "causal_lm",
               "sampling": "random", "max_examples": None, "max_tokens": None},
    "hf_dataset": {"path": _REQUIRED, "split": None, "tokenizer": None, "text_column": None, "label_column": "label",
                   "image_column": None, "task": "auto", "max_length": None, "padding": "longest",
                   "max_examples": None, "max_tokens": None},
    "image_folder": {"path": _REQUIRED, "max_examples": None},
}
_CHOICES = {"dtype": tuple(TOKEN_DTYPES), "layout": LAYOUTS, "sampling": SAMPLINGS, "task": TASKS, "padding": PADDINGS}
_POSITIVE = ("block_size", "max_examples", "max_tokens", "max_length")
_STRINGS = ("split", "tokenizer", "text_column", "label_column", "image_column")


def kind_of(spec: Mapping[str, Any]) -> str | None:
    """Which local data kind a spec names (``"tokens"``, ``"hf_dataset"``, ``"image_folder"``), or None."""
    found = [k for k in KINDS if k in spec]
    return found[0] if len(found) == 1 else None


def normalize(kind: str, value: Any, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """The canonical options of a local data spec (defaults filled in) and the seed found inside them.

    Returns ``(options, seed_or_None)``; the caller merges the seed with the spec's top-level one.
    Raises UserError with a one-line fix for an unknown option, a wrong type or a bad choice.
    """
    example = {"tokens": '{"path": "train.bin", "block_size": 64}', "hf_dataset": '{"path": "ds_dir"}',
               "image_folder": '{"path": "imgs/"}'}[kind]
    if not isinstance(value, Mapping):
        raise UserError(f"spec {kind!r} must be a dict of options such as {example}, got {type(value).__name__}")
    if kwargs:
        raise UserError(f"spec {kind!r} takes no kwargs (got {', '.join(sorted(kwargs))}); put them in the {kind!r} dict")
    allowed = OPTIONS[kind]
    unknown = sorted(str(k) for k in value if k not in allowed and k != "seed")
    if unknown:
        raise UserError(f"unknown {kind} option(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}, seed")
    out: dict[str, Any] = {}
    for key, default in allowed.items():
        v = value.get(key, None if default is _REQUIRED else default)
        if v is None and default is _REQUIRED:
            raise UserError(f"spec {kind!r} needs {key!r}, e.g. {example}")
        out[key] = _check_option(kind, key, v)
    return out, value.get("seed")


def _check_option(kind: str, key: str, v: Any) -> Any:
    if v is None:
        return None
    if key == "path" or key in _STRINGS:
        if not isinstance(v, str) or not v:
            raise UserError(f"{kind} option {key!r} must be a non-empty string, got {v!r}")
    elif key in _POSITIVE:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"{kind} option {key!r} must be a positive integer, got {v!r}")
    elif key in _CHOICES and v not in _CHOICES[key]:
        raise UserError(f"unknown {kind} {key} {v!r}; choose one of {', '.join(_CHOICES[key])}")
    return v


def label(canon: Mapping[str, Any]) -> str:
    """A short name for messages: ``"'tokens train.bin'"``."""
    kind = kind_of(canon)
    return f"'{kind} {canon[kind]['path']}'"


def resolve(canon: Mapping[str, Any]) -> Callable[..., Any]:
    """The builder of a canonical local data spec: a callable taking only ``seed``."""
    kind = kind_of(canon)
    builder = {"tokens": build_tokens, "hf_dataset": build_hf_dataset, "image_folder": build_image_folder}[kind]
    return partial(_building, builder, dict(canon[kind]))


def _building(builder: Callable[..., Any], options: dict[str, Any], seed: int = 0) -> Any:
    """``builder(**options, seed=seed)``, a file-system error turned into one UserError line."""
    try:
        return builder(**options, seed=seed)
    except OSError as err:
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        raise UserError(f"{where}cannot read it ({err.strerror or err}); check the path and its permissions") from None


class LocalDataset(torch.utils.data.Dataset):
    """Examples as dicts of tensors (``input_ids``, ``labels``, ...), with a record of how they were chosen.

    Args:
        columns: name → tensor, all with the same leading dimension N (the examples).
        info: what :meth:`describe` returns.
    """

    def __init__(self, columns: Mapping[str, Tensor], info: Mapping[str, Any]) -> None:
        self.columns = dict(columns)
        self.info = dict(info)

    def __len__(self) -> int:
        return int(next(iter(self.columns.values())).shape[0])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.columns.items()}

    def describe(self) -> dict[str, Any]:
        """What was used (a JSON-able dict: kind, path, seed, n_examples, n_tokens, limits, subset hash)."""
        return dict(self.info)


class LocalPair(tuple):
    """An ``(inputs, targets)`` pair of tensors that also records how it was chosen (``describe()``)."""

    def __new__(cls, inputs: Tensor, targets: Tensor, info: Mapping[str, Any]) -> "LocalPair":
        """The pair ``(inputs, targets)``, with ``info`` kept for :meth:`describe`."""
        pair = super().__new__(cls, (inputs, targets))
        pair.info = dict(info)
        return pair

    def describe(self) -> dict[str, Any]:
        """What was used (a JSON-able dict: kind, path, seed, n_examples, n_tokens, limits, subset hash)."""
        return dict(self.info)


def describe(data: Any) -> dict[str, Any] | None:
    """The record a local data object keeps of what it used (``data.describe()``), or None for other data."""
    fn = getattr(data, "describe", None)
    return fn() if callable(fn) else None


def _digest(values: np.ndarray) -> str:
    """sha256 (16 hex digits) of integers as little-endian int64: the fingerprint of offsets or indices."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype="<i8").tobytes()).hexdigest()[:16]


def _existing(path: str, what: str, *, folder: bool | None = None) -> Path:
    """``path`` resolved against the working directory; UserError naming it when missing or of the wrong kind."""
    resolved = Path(os.path.expanduser(path)).resolve()
    if not resolved.exists():
        raise UserError(f"{path}: no such {what} (looked at {resolved}); check the path in the data spec")
    if folder is True and not resolved.is_dir():
        raise UserError(f"{path}: is a file, but the {what} must be a folder; give the folder's path")
    if folder is False and not resolved.is_file():
        raise UserError(f"{path}: is not a file; give the path of the {what}")
    return resolved


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _order(n: int, seed: int, shuffle: bool) -> np.ndarray:
    """0..n−1 in file order, or in the order of a permutation seeded by ``seed``."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return torch.randperm(n, generator=_generator(seed)).numpy().astype(np.int64)


# ---------------------------------------------------------------------------------------------- tokens


def token_windows(n_tokens: int, block_size: int, n: int, *, sampling: str = "random", seed: int = 0) -> np.ndarray:
    """Offsets i of n windows data[i : i + block_size + 1] in a stream of ``n_tokens`` tokens, int64 (n,).

    ``random``: nanoGPT's ``torch.randint(n_tokens − block_size, (n,))`` on a generator seeded with
    ``seed``; ``sequential``: i = k·block_size for k < min(n, (n_tokens − 1) // block_size).
    """
    if sampling == "sequential":
        count = min(n, (n_tokens - 1) // block_size)
        return np.arange(count, dtype=np.int64) * block_size
    return torch.randint(n_tokens - block_size, (n,), generator=_generator(seed)).numpy().astype(np.int64)


def build_tokens(path: str, block_size: int, dtype: str = "uint16", layout: str = "causal_lm",
                 sampling: str = "random", max_examples: int | None = None, max_tokens: int | None = None,
                 seed: int = 0) -> LocalDataset | LocalPair:
    """Windows of block_size + 1 tokens from a nanoGPT ``.bin`` stream (see the module docstring).

    Returns a :class:`LocalDataset` of ``{"input_ids": w, "labels": w}`` (``layout="causal_lm"``)
    or a :class:`LocalPair` ``(x, y)`` = (w[:, :-1], w[:, 1:]) (``layout="pair"``), int64.
    """
    file = _existing(path, "token file", folder=False)
    itemsize = np.dtype(TOKEN_DTYPES[dtype]).itemsize
    size = file.stat().st_size
    if size % itemsize:
        raise UserError(f"{path}: {size} bytes is not a whole number of {dtype} tokens ({itemsize} bytes each); "
                        "give the dtype the file was written with (uint16 or uint32)")
    total = size // itemsize
    if total < block_size + 1:
        raise UserError(f"{path}: holds {total} {dtype} tokens, fewer than block_size + 1 = {block_size + 1}; "
                        "give a smaller block_size or a longer file")
    if max_examples is None and max_tokens is None:
        n = (total - 1) // block_size  # the windows that tile the stream once
        if n * block_size > MAX_DEFAULT_TOKENS:
            raise UserError(f"{path}: {total} tokens is too many to take whole; give max_examples (windows) or "
                            "max_tokens in the tokens spec")
    else:
        n = min(v for v in (max_examples, None if max_tokens is None else max_tokens // block_size) if v is not None)
        if n < 1:
            raise UserError(f"tokens max_tokens {max_tokens} is below block_size {block_size}; one window predicts "
                            "block_size tokens, so give max_tokens ≥ block_size")
    offsets = token_windows(total, block_size, n, sampling=sampling, seed=seed)
    data = np.memmap(file, dtype=TOKEN_DTYPES[dtype], mode="r")  # (M,) read lazily, never executed
    windows = torch.from_numpy(data[offsets[:, None] + np.arange(block_size + 1)].astype(np.int64))  # (n, T+1)
    del data
    info = {"kind": "tokens", "path": str(file), "file_tokens": total, "dtype": dtype, "block_size": block_size,
            "layout": layout, "sampling": sampling, "seed": seed, "max_examples": max_examples,
            "max_tokens": max_tokens, "n_examples": len(offsets), "n_tokens": len(offsets) * block_size,
            "offsets_sha256": _digest(offsets)}
    if layout == "pair":
        return LocalPair(windows[:, :-1].clone(), windows[:, 1:].clone(), info)
    return LocalDataset({"input_ids": windows, "labels": windows.clone()}, info)


# ------------------------------------------------------------------------------------------ hf_dataset


def _load_dataset(path: str, split: str | None) -> Any:
    datasets = _library("datasets", "hf_dataset specs")
    folder = _existing(path, "datasets folder", folder=True)
    try:
        ds = datasets.load_from_disk(str(folder))
    except FileNotFoundError:
        raise UserError(f"{path}: is not a folder written by datasets' save_to_disk (no dataset_info.json / "
                        "state.json); give the folder save_to_disk wrote") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = sorted(ds)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in ds:
            raise UserError(f"{path}: holds the splits {', '.join(splits)}; give 'split': one of them in the "
                            "hf_dataset spec")
        ds = ds[split]
    elif split is not None:
        raise UserError(f"{path}: is a single Dataset with no splits; drop 'split' from the hf_dataset spec")
    return ds


def _load_tokenizer(path: str) -> Any:
    transformers = _library("transformers", "a tokenizer folder")
    folder = _existing(path, "tokenizer folder", folder=True)
    try:  # local files only, never a repository's code
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path}: transformers cannot load a tokenizer from it ({first}); give a folder written "
                        "by tokenizer.save_pretrained") from None


def _library(name: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{what} need {name}, which is not installed; pip install {name}") from None


def _pad(rows: Sequence[Sequence[int]], length: int, value: int, side: str = "right") -> Tensor:
    """Integer rows padded with ``value`` to ``length`` on ``side``, int64 (N, length)."""
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        t = torch.as_tensor(list(row), dtype=torch.long)
        if side == "left":
            out[i, length - len(t):] = t
        else:
            out[i, : len(t)] = t
    return out


def _int_rows(values: Any, column: str, path: str) -> list[list[int]]:
    rows = []
    for v in values:
        arr = np.asarray(v)
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise UserError(f"{path}: column {column!r} must hold lists of integer token ids, got {arr.dtype} "
                            f"with shape {arr.shape}; tokenize it or give 'text_column' and 'tokenizer'")
        rows.append(arr.astype(np.int64).tolist())
    return rows


def _sequences(sub: Any, opts: Mapping[str, Any], path: str) -> tuple[dict[str, list], dict]:
    """Token rows (input_ids, attention_mask, labels or None) of the chosen examples ``sub``, truncated."""
    columns = set(sub.column_names)
    max_length = opts["max_length"]
    text_column = opts["text_column"]
    if text_column is None and "input_ids" not in columns and "text" in columns:
        text_column = "text"
    meta: dict[str, Any] = {"text_column": text_column, "pad_id": 0, "side": "right"}
    if text_column is not None:
        if text_column not in columns:
            raise UserError(f"{path}: has no column {text_column!r} (columns: {', '.join(sorted(columns))}); "
                            "give the text column's name as 'text_column'")
        if opts["tokenizer"] is None:
            raise UserError(f"{path}: column {text_column!r} is raw text; give 'tokenizer': a folder written by "
                            "tokenizer.save_pretrained")
        tok = _load_tokenizer(opts["tokenizer"])
        texts = list(sub[text_column])
        bad = [t for t in texts if not isinstance(t, str)]
        if bad:
            raise UserError(f"{path}: column {text_column!r} holds {type(bad[0]).__name__}, not text; give a text column")
        enc = tok(texts, truncation=max_length is not None, max_length=max_length, padding=False)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        meta.update(pad_id=pad_id, side=getattr(tok, "padding_side", "right") or "right")  # None: checked if needed
        ids = [list(r) for r in enc["input_ids"]]
        mask = [list(r) for r in enc["attention_mask"]] if "attention_mask" in enc else [[1] * len(r) for r in ids]
        return {"input_ids": ids, "attention_mask": mask, "labels": None}, meta
    if "input_ids" not in columns:
        return {}, meta
    if opts["tokenizer"] is not None:
        tok = _load_tokenizer(opts["tokenizer"])
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        meta.update(pad_id=int(pad_id or 0), side=getattr(tok, "padding_side", "right") or "right")
    cut = (lambda r: r[:max_length]) if max_length is not None else (lambda r: r)
    ids = [cut(r) for r in _int_rows(sub["input_ids"], "input_ids", path)]
    mask = ([cut(r) for r in _int_rows(sub["attention_mask"], "attention_mask", path)] if "attention_mask" in columns
            else [[1] * len(r) for r in ids])
    labels = None
    if "labels" in columns and opts["task"] != "classification":
        labels = [cut(r) for r in _int_rows(sub["labels"], "labels", path)]
    if any(len(a) != len(b) for a, b in zip(ids, mask)) or (labels and any(len(a) != len(b) for a, b in zip(ids, labels))):
        raise UserError(f"{path}: input_ids, attention_mask and labels differ in length in some row; fix the dataset")
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, meta


def _images(values: Sequence[Any], column: str, path: str) -> Tensor:
    """Image rows (arrays, or PIL images scaled to [0, 1] channels-first) stacked into one float tensor."""
    out = []
    for v in values:
        if hasattr(v, "convert") and hasattr(v, "size"):  # a PIL image, as datasets' Image feature decodes it
            out.append(_pil_tensor(v))
            continue
        arr = np.asarray(v)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise UserError(f"{path}: column {column!r} holds {arr.dtype} values, not numeric images; give "
                            "pixel arrays or an Image column")
        out.append(_as_float(torch.from_numpy(np.array(arr))))
    return _stack(out, [f"row {i}" for i in range(len(out))], path)


def _label_tensor(values: Any, column: str, path: str) -> Tensor:
    arr = np.asarray(list(values))
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"{path}: label column {column!r} must hold one integer class per row, got {arr.dtype} "
                        f"with shape {arr.shape}; give the class-index column as 'label_column'")
    return torch.from_numpy(arr.astype(np.int64))


def build_hf_dataset(path: str, split: str | None = None, tokenizer: str | None = None, text_column: str | None = None,
                     label_column: str = "label", image_column: str | None = None, task: str = "auto",
                     max_length: int | None = None, padding: str = "longest", max_examples: int | None = None,
                     max_tokens: int | None = None, seed: int = 0) -> LocalDataset:
    """Examples of a ``save_to_disk`` folder as a Dataset of dicts (see the module docstring)."""
    ds = _load_dataset(path, split)
    columns = set(ds.column_names)
    if task == "auto":
        task = "classification" if label_column in columns else "causal_lm"
    if task == "classification" and label_column not in columns:
        raise UserError(f"{path}: has no label column {label_column!r} (columns: {', '.join(sorted(columns))}); "
                        "give the class column as 'label_column'")
    if padding == "max_length" and max_length is None:
        raise UserError("hf_dataset padding 'max_length' needs 'max_length'; give it, or padding 'longest'")
    n_rows = len(ds)
    if n_rows == 0:
        raise UserError(f"{path}: the dataset has no rows; give a dataset with examples")
    shuffle = max_examples is not None or max_tokens is not None
    order = _order(n_rows, seed, shuffle)[: max_examples or n_rows]
    opts = {"max_length": max_length, "text_column": text_column, "tokenizer": tokenizer, "task": task}
    sub = ds.select(order.tolist(), keep_in_memory=True)  # the chosen rows; nothing written beside the dataset
    seqs, meta = _sequences(sub, opts, path)
    out: dict[str, Tensor] = {}
    n_tokens: int | None = None
    if seqs:
        lengths = np.array([sum(m) for m in seqs["attention_mask"]], dtype=np.int64)
        if max_tokens is not None:
            keep = int(np.searchsorted(np.cumsum(lengths), max_tokens, side="right"))  # longest prefix within budget
            if keep == 0:
                raise UserError(f"hf_dataset max_tokens {max_tokens} is below the first chosen example's "
                                f"{int(lengths[0])} tokens; give a larger max_tokens")
            order, lengths = order[:keep], lengths[:keep]
            seqs = {k: (v[:keep] if v is not None else None) for k, v in seqs.items()}
        width = max_length if padding == "max_length" else max(len(r) for r in seqs["input_ids"])
        side = meta["side"]
        if meta["pad_id"] is None and any(len(r) < width for r in seqs["input_ids"]):
            raise UserError(f"{tokenizer}: the tokenizer has neither a pad nor an EOS token to pad with; add a pad "
                            "token (tokenizer.add_special_tokens) and save it again")
        out["input_ids"] = _pad(seqs["input_ids"], width, 0 if meta["pad_id"] is None else int(meta["pad_id"]), side)
        out["attention_mask"] = _pad(seqs["attention_mask"], width, 0, side)
        if task == "causal_lm":
            labels = out["input_ids"] if seqs["labels"] is None else _pad(seqs["labels"], width, IGNORE_INDEX, side)
            out["labels"] = labels.masked_fill(out["attention_mask"] == 0, IGNORE_INDEX)  # padding counts for nothing
        n_tokens = int(lengths.sum())
    else:
        if max_tokens is not None:
            raise UserError(f"{path}: has no token data (no text or input_ids column); drop max_tokens")
        column = image_column or next((c for c in ("pixel_values", "image") if c in columns), None)
        if column is None or column not in columns:
            raise UserError(f"{path}: has no text, input_ids or image column (columns: {', '.join(sorted(columns))}); "
                            "give 'text_column' with 'tokenizer', or 'image_column'")
        if task != "classification":
            raise UserError(f"{path}: image column {column!r} needs a classification label column; give "
                            "'label_column' (task 'classification')")
        out["pixel_values"] = _images(list(sub[column]), column, path)
    if task == "classification":  # the first len(order) rows: max_tokens may have cut the chosen ones short
        out["labels"] = _label_tensor(list(sub[label_column])[: len(order)], label_column, path)
    info = {"kind": "hf_dataset", "path": str(Path(os.path.expanduser(path)).resolve()), "split": split,
            "task": task, "tokenizer": None if tokenizer is None else str(Path(os.path.expanduser(tokenizer)).resolve()),
            "text_column": meta["text_column"], "max_length": max_length, "padding": padding, "seed": seed,
            "max_examples": max_examples, "max_tokens": max_tokens, "n_rows": n_rows, "n_examples": len(order),
            "n_tokens": n_tokens, "columns": sorted(out), "indices_sha256": _digest(order),
            "dataset_fingerprint": getattr(ds, "_fingerprint", None)}
    return LocalDataset(out, info)


# ---------------------------------------------------------------------------------------- image_folder


def _as_float(t: Tensor) -> Tensor:
    """Floating tensors as they are; integer and bool ones as float32 with the same values."""
    return t if t.is_floating_point() else t.to(torch.float32)


def _pil_tensor(image: Any) -> Tensor:
    """A PIL image as torchvision's ToTensor gives it: float32 (C, H, W) in [0, 1]."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]  # (H, W) grey → (H, W, 1)
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0 if arr.dtype == np.uint8 else 1.0
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(torch.float32) / scale


def _read_sample(file: Path, root: Path) -> Tensor:
    """One file's tensor, read as data: torch weights-only, numpy without pickle, images through PIL."""
    name = str(file.relative_to(root))
    suffix = file.suffix.lower()
    if suffix == ".pt":
        try:
            t = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # an UnpicklingError for anything but plain tensors: refused, never run
            first = (str(err).strip().splitlines() or [""])[0][:160]
            raise UserError(f"{name}: not a plain tensor file ({type(err).__name__}: {first}); save it with "
                            "torch.save(tensor, path)") from None
        if not isinstance(t, Tensor):
            raise UserError(f"{name}: holds a {type(t).__name__}, not one tensor; save each example as one tensor")
        return _as_float(t)
    if suffix == ".npy":
        try:
            arr = np.load(file, allow_pickle=False)
        except ValueError as err:  # object arrays need pickle: refused, never run
            raise UserError(f"{name}: cannot be read without pickle ({err}); save a numeric array with "
                            "np.save(path, array)") from None
        if not isinstance(arr, np.ndarray) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise UserError(f"{name}: holds {getattr(arr, 'dtype', type(arr).__name__)}, not a numeric array")
        return _as_float(torch.from_numpy(np.array(arr)))
    try:
        from PIL import Image
    except ImportError:
        raise UserError(f"{name}: image files need Pillow, which is not installed; pip install pillow, or save the "
                        "images as .pt or .npy") from None
    with Image.open(file) as image:
        image.load()
        return _pil_tensor(image)


def _stack(tensors: Sequence[Tensor], names: Sequence[str], where: str) -> Tensor:
    shape = tuple(tensors[0].shape)
    for t, name in zip(tensors, names):
        if tuple(t.shape) != shape:
            raise UserError(f"{where}: {name} has shape {tuple(t.shape)} but {names[0]} has {shape}; give examples of "
                            "one shape (resize them first)")
    return torch.stack(list(tensors))


def build_image_folder(path: str, max_examples: int | None = None, seed: int = 0) -> LocalPair:
    """(inputs (N, ...) float, labels (N,) int64) from ``path/<class>/<file>`` (see the module docstring)."""
    root = _existing(path, "image folder", folder=True)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{path}: has no class subfolders; lay it out as {path}/<class>/<file>.pt|.npy|.png")
    files: list[Path] = []
    labels: list[int] = []
    for k, name in enumerate(classes):
        found = sorted(f for f in (root / name).iterdir()
                       if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in FILE_SUFFIXES)
        if not found:
            raise UserError(f"{path}: class folder {name!r} holds no {', '.join(FILE_SUFFIXES)} file; add examples "
                            "or remove the folder")
        files += found
        labels += [k] * len(found)
    order = _order(len(files), seed, max_examples is not None)[: max_examples or len(files)]
    chosen = [files[i] for i in order]
    x = _stack([_read_sample(f, root) for f in chosen], [str(f.relative_to(root)) for f in chosen], path)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64)[order])
    counts = np.bincount(y.numpy(), minlength=len(classes))
    info = {"kind": "image_folder", "path": str(root), "classes": classes, "seed": seed, "max_examples": max_examples,
            "n_files": len(files), "n_examples": len(order), "n_tokens": None,
            "class_counts": [int(c) for c in counts], "shape": list(x.shape[1:]), "indices_sha256": _digest(order)}
    return LocalPair(x, y, info)


def with_limits(options: Mapping[str, Any], kind: str, *, max_examples: int | None = None,
                max_tokens: int | None = None) -> dict[str, Any]:
    """The options of a canonical local spec with ``max_examples``/``max_tokens`` tightened to the given ones.

    The smaller of the spec's own limit and the given one wins. ``max_tokens`` on an image folder
    is refused (it holds no tokens). For the CLI's ``--max-examples``/``--max-tokens``.
    """
    out = dict(options)
    for key, value in (("max_examples", max_examples), ("max_tokens", max_tokens)):
        if value is None:
            continue
        if key not in OPTIONS[kind]:
            raise UserError(f"--max-tokens applies to token data (tokens, hf_dataset specs), not {kind}; drop it")
        out[key] = _check_option(kind, key, value) if out.get(key) is None else min(out[key], value)
    return out


def summary(info: Mapping[str, Any]) -> str:
    """One line for logs: ``"tokens train.bin: 256 examples, 16384 tokens, seed 0"``."""
    tokens = f", {info['n_tokens']} tokens" if info.get("n_tokens") is not None else ""
    return f"{info['kind']} {info['path']}: {info['n_examples']} examples{tokens}, seed {info['seed']}"


__all__ = ["KINDS", "LocalDataset", "LocalPair", "build_hf_dataset", "build_image_folder", "build_tokens", "describe",
           "kind_of", "normalize", "resolve", "summary", "token_windows", "with_limits"]
