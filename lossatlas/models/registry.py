"""Rebuild a model or a data set from a JSON spec: files are data, a spec in a file is configuration.

A spec names a registered builder or a user's own factory, plus its keyword arguments::

    {"name": "mlp", "kwargs": {"widths": [64, 128, 10]}, "seed": 0}
    {"factory": "mypackage.nets:build", "kwargs": {"width": 32}}
    {"hf": {"auto_class": "AutoModelForCausalLM", "config": {"model_type": "gpt2"}}}
    {"timm": "resnet18"}   {"torchvision": "resnet18", "kwargs": {"num_classes": 10}}
    {"tokens": {"path": "train.bin", "block_size": 64, "max_examples": 256}, "seed": 0}
    {"hf_dataset": {"path": "ds_dir", "tokenizer": "tok_dir", "max_length": 128}}   {"image_folder": {"path": "imgs/"}}

Keys: exactly one of ``name``/``factory``/``hf``/``timm``/``torchvision``/``tokens``/``hf_dataset``/
``image_folder`` (``hf``/``timm``/``torchvision`` build models from configuration only:
lossatlas.models.builders; ``tokens``/``hf_dataset``/``image_folder`` build data from local files:
lossatlas.models.local_data, their options in their own dict, defaults filled in by
:func:`normalize_spec`); optional ``kwargs`` (a dict of JSON values; none for the local data kinds) and
``seed`` (int ≥ 0; may also be given as ``kwargs["seed"]``, or inside a local data kind's options).
A spec means what it says about the seed: a ``factory`` spec without one calls the factory without
a ``seed`` argument, so the factory's own default applies (``def data(seed=1)`` gets 1); the other
kinds (registered names, configuration-only models, local data) default to seed 0, which is what
their builders default to. The canonical form from :func:`normalize_spec` always holds ``kwargs``
and never ``kwargs["seed"]``; it holds a top-level ``seed`` except for a factory spec that gives
none, so a spec with a seed and one without never share a fingerprint.

A spec read from a run file comes as a :class:`lossatlas.trust.StoredSpec`; one that names a
factory is built only when this user signed it or the caller passes ``trust_factory=True``
(checked before anything is imported). A spec the caller writes is the caller's own and trusted.
A factory's module is looked up on ``sys.path`` with two more folders: the working directory
first (as ``python -m`` puts it), and, for a spec read from a run file, that file's folder last
(where the training script that wrote it usually sits). So ``nets.py`` beside the user's script is
found without PYTHONPATH when lossatlas runs in that folder or the run file lies in it; a script run
as ``python train.py`` has its own folder on ``sys.path`` already.

Building is deterministic: the builder runs with torch's (and numpy's and Python's) global RNG
seeded inside a fork (with the spec's seed, or 0 for a factory spec that gives none), so the same
spec gives identical initial weights and the caller's RNG state is left as it was. A builder whose
signature has a ``seed`` parameter also receives the seed as an argument, a factory only when its
spec gives one.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import inspect
import json
import os
import random
import re
import sys
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from lossatlas import trust
from lossatlas.errors import UserError
from lossatlas.models import builders, local_data

MODELS: dict[str, Callable[..., nn.Module]] = {}
DATASETS: dict[str, Callable[..., Any]] = {}

SPEC_KEYS: tuple[str, ...] = ("name", "factory", "kwargs", "seed", *builders.KINDS, *local_data.KINDS)
_SOURCES: tuple[str, ...] = ("name", "factory", *builders.KINDS, *local_data.KINDS)  # a spec gives exactly one
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
_FACTORY_PATH = re.compile(rf"^{_DOTTED}:{_DOTTED}$")  # package.module:function (or :Class.method)


def _register(table: dict[str, Callable[..., Any]], kind: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    if not isinstance(name, str) or not name:
        raise TypeError(f"a {kind} name must be a non-empty string, got {name!r}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in table and table[name] is not fn:
            raise TypeError(f"{kind} name {name!r} is registered twice")
        table[name] = fn
        return fn

    return decorator


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a model builder reachable as ``{"name": name, "kwargs": {...}}``."""
    return _register(MODELS, "model", name)


def register_data(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make a data builder reachable as ``{"name": name, "kwargs": {...}}``.

    A registered builder with a ``seed`` parameter always receives the spec's seed (default 0), so
    ``{"name": name}`` and ``{"name": name, "seed": 0}`` are the same data; use a ``factory`` spec
    to keep a function's own default seed.
    """
    return _register(DATASETS, "data", name)


def normalize_spec(spec: Mapping[str, Any] | str) -> dict[str, Any]:
    """The validated, canonical, JSON-able form of a spec (a dict or a JSON string).

    Returns ``{"name" | "factory" | "hf" | "timm" | "torchvision" | "tokens" | "hf_dataset" | "image_folder": ...,
    "kwargs": dict, "seed": int}``; ``kwargs["seed"]`` (or a local data kind's ``seed`` option) moves to the
    top level. A factory spec that gives no seed has no ``seed`` key (its factory's own default applies);
    every other kind defaults to seed 0. Raises UserError with a one-line fix for anything malformed.
    """
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as err:
            raise UserError(f"spec is not valid JSON ({err.msg} at char {err.pos}); give e.g. '{{\"name\": \"mlp\"}}'") from None
    if not isinstance(spec, Mapping):
        raise UserError(f"spec must be a dict like {{\"name\": \"mlp\", \"kwargs\": {{}}}}, got {type(spec).__name__}")
    unknown = sorted(str(k) for k in spec if k not in SPEC_KEYS)
    if unknown:
        raise UserError(f"unknown spec key(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(SPEC_KEYS)}")
    given = [k for k in _SOURCES if k in spec]
    if len(given) != 1:
        which = ("neither of 'name' and 'factory'" if not given else f"both of {given[0]!r} and {given[1]!r}"
                 if len(given) == 2 else f"all of {', '.join(map(repr, given))}")
        raise UserError(
            f"spec has {which}; give exactly one, "
            'e.g. {"name": "mlp"}, {"factory": "pkg.module:build"}, {"hf" | "timm" | "torchvision": ...} '
            'or {"tokens" | "hf_dataset" | "image_folder": {"path": ...}}'
        )
    has_name = given[0] == "name"
    kwargs = spec.get("kwargs", {})
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping):
        raise UserError(f"spec 'kwargs' must be a dict of keyword arguments, got {type(kwargs).__name__}")
    try:
        kwargs = json.loads(json.dumps(dict(kwargs)))  # canonical JSON values: tuples become lists
    except (TypeError, ValueError) as err:
        raise UserError(f"spec 'kwargs' must hold only JSON values (numbers, strings, lists, dicts): {err}") from None
    seed_in_kwargs = kwargs.pop("seed", None)
    out: dict[str, Any] = {}
    local = given[0] in local_data.KINDS
    if local:  # local files: the options dict may hold the seed, checked like one in kwargs
        out[given[0]], inner_seed = local_data.normalize(given[0], spec[given[0]], kwargs)
        if inner_seed is not None:
            seed_in_kwargs = _resolve_seed(inner_seed, seed_in_kwargs)
    seed = _resolve_seed(spec.get("seed"), seed_in_kwargs)
    if local:
        pass  # normalized above
    elif given[0] in builders.KINDS:
        out[given[0]] = builders.normalize(given[0], spec[given[0]], kwargs)
    elif has_name:
        name = spec["name"]
        if not isinstance(name, str) or not name:
            raise UserError(f"spec 'name' must be a non-empty string, got {name!r}")
        out["name"] = name
    else:
        path = spec["factory"]
        if not isinstance(path, str) or not _FACTORY_PATH.match(path):
            raise UserError(f"spec 'factory' must look like 'package.module:function', got {path!r}")
        out["factory"] = path
    out["kwargs"] = kwargs
    if seed is not None or "factory" not in out:  # a factory without a seed keeps its own default
        out["seed"] = 0 if seed is None else seed
    return out


def _resolve_seed(top: Any, in_kwargs: Any) -> int | None:
    """The one seed a spec gives (at the top or in kwargs), or None when it gives none."""
    for value in (top, in_kwargs):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise UserError(f"spec 'seed' must be a non-negative integer, got {value!r}")
    if top is not None and in_kwargs is not None and top != in_kwargs:
        raise UserError(f"spec gives two seeds ({top} at the top, {in_kwargs} in kwargs); keep one")
    return int(top) if top is not None else int(in_kwargs) if in_kwargs is not None else None


def spec_fingerprint(spec: Mapping[str, Any] | str) -> str:
    """sha256 (16 hex digits) of the canonical spec's sorted, compact JSON."""
    blob = json.dumps(normalize_spec(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_model(spec: Mapping[str, Any] | str, *, trust_factory: bool = False) -> nn.Module:
    """The model a spec describes, with initial weights fixed by its seed (global RNG untouched).

    A factory spec read from a file that this user did not sign is refused unless ``trust_factory``.
    """
    trust.require_trusted(spec, trust_factory=trust_factory)
    canon = normalize_spec(spec)
    model = _call(canon, MODELS, "model", near=_source_folder(spec))
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory {_label(canon)} returned {type(model).__name__}; it must return a torch.nn.Module")
    return model


def build_data(spec: Mapping[str, Any] | str, *, trust_factory: bool = False) -> Any:
    """The data a spec describes: an (inputs, targets) pair, a Dataset or an iterable of batches.

    A factory spec read from a file that this user did not sign is refused unless ``trust_factory``.
    """
    trust.require_trusted(spec, trust_factory=trust_factory)
    canon = normalize_spec(spec)
    data = _call(canon, DATASETS, "data", near=_source_folder(spec))
    is_pair = isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)
    is_dataset = isinstance(data, torch.utils.data.Dataset)
    is_iterable = hasattr(data, "__iter__") and not isinstance(data, (str, bytes, torch.Tensor, Mapping))
    if not (is_pair or is_dataset or is_iterable):
        raise UserError(
            f"data factory {_label(canon)} returned {type(data).__name__}; it must return an (inputs, targets) "
            "pair of tensors, a torch Dataset or an iterable of (inputs, targets) batches"
        )
    return data


def limit_data_spec(spec: Mapping[str, Any] | str, *, max_examples: int | None = None,
                    max_tokens: int | None = None) -> tuple[Any, bool]:
    """``(spec, applied)``: a local data spec with ``--max-examples``/``--max-tokens`` moved into its options.

    For ``tokens``/``hf_dataset``/``image_folder`` specs the limits become the spec's own (the
    smaller one wins), so the subset is the seeded one the spec describes and ``applied`` is True:
    the caller then takes every example the data gives. Any other spec comes back as it was with
    ``applied`` False (the caller keeps the first ``max_examples``); ``max_tokens`` on it is refused.
    """
    canon = normalize_spec(spec)
    kind = local_data.kind_of(canon)
    if kind is None:
        if max_tokens is not None:
            raise UserError(f"--max-tokens applies to token data specs (tokens, hf_dataset), not {_label(canon)}; "
                            "drop it or use --max-examples")
        return spec, False
    if max_examples is None and max_tokens is None:
        return canon, True
    limited = local_data.with_limits(canon[kind], kind, max_examples=max_examples, max_tokens=max_tokens)
    return {**canon, kind: limited}, True


def _label(canon: Mapping[str, Any]) -> str:
    if local_data.kind_of(canon):
        return local_data.label(canon)
    if builders.kind_of(canon):
        return builders.label(canon)
    return repr(canon.get("name", canon.get("factory")))


def _resolve(canon: Mapping[str, Any], table: Mapping[str, Callable[..., Any]], kind: str) -> Callable[..., Any]:
    if "name" in canon:
        name = canon["name"]
        if name not in table:
            close = difflib.get_close_matches(name, list(table), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(
                f"unknown {kind} {name!r}{hint}; known {kind} names: {', '.join(sorted(table))}, "
                "or give {\"factory\": \"pkg.module:function\"}"
            )
        return table[name]
    if local_data.kind_of(canon):
        if kind != "data":
            raise UserError(f"a {local_data.kind_of(canon)!r} spec reads data, not a {kind}; give the {kind} as "
                            "{\"name\": ...}, {\"factory\": ...} or {\"hf\": ...}")
        return local_data.resolve(canon)
    if builders.kind_of(canon):
        if kind != "model":
            raise UserError(f"a {builders.kind_of(canon)!r} spec builds a model, not {kind}; give the {kind} as "
                            "{\"name\": ...} or {\"factory\": ...}")
        return builders.resolve(canon)
    module_name, _, attr_path = canon["factory"].partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # an ImportError, or any error raised while importing the user's module
        raise UserError(
            f"cannot import module {module_name!r} for {kind} factory {canon['factory']!r} "
            f"({type(err).__name__}: {err}); check that it is installed, on sys.path or in the working directory"
        ) from None
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise UserError(
                f"module {module_name!r} has no attribute {attr_path!r}; check the {kind} factory {canon['factory']!r}"
            )
        obj = getattr(obj, attr)
    if not callable(obj):
        raise UserError(f"{kind} factory {canon['factory']!r} is a {type(obj).__name__}, not a callable")
    return obj


def check_builder(spec: Mapping[str, Any] | str, kind: str) -> None:
    """Refuse a spec naming an unregistered ``kind`` ("model" or "data") or kwargs its builder does not take.

    Nothing is built, and a factory spec is left alone (checking it would import the factory's module).
    """
    canon = normalize_spec(spec)
    if local_data.kind_of(canon) and kind != "data":
        _resolve(canon, MODELS, kind)  # refuses: a local data spec builds no model
    if "name" in canon:
        _bound_kwargs(canon, _resolve(canon, MODELS if kind == "model" else DATASETS, kind), kind)


def _bound_kwargs(canon: Mapping[str, Any], fn: Callable[..., Any], kind: str) -> dict[str, Any]:
    """The spec's kwargs (with its seed where ``fn`` takes one), checked against ``fn``'s signature."""
    kwargs = dict(canon["kwargs"])
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: just call
        return kwargs
    if "seed" in signature.parameters and canon.get("seed") is not None:  # a factory's own default otherwise
        kwargs["seed"] = canon["seed"]
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        accepted = ", ".join(p for p in signature.parameters if p != "seed") or "none"
        raise UserError(f"bad kwargs for {kind} {_label(canon)}: {err}; accepted kwargs: {accepted}") from None
    return kwargs


def _call(canon: Mapping[str, Any], table: Mapping[str, Callable[..., Any]], kind: str,
          near: str | None = None) -> Any:
    with _factory_path(near) if "factory" in canon else contextlib.nullcontext():
        fn = _resolve(canon, table, kind)
        kwargs = _bound_kwargs(canon, fn, kind)
        with _seeded(canon.get("seed", 0)):  # a factory without a seed still builds the same way every time
            return _run(fn, kwargs, canon, kind)


def _source_folder(spec: Any) -> str | None:
    """The folder of the run file a stored spec was read from (None for a spec the caller wrote)."""
    source = getattr(spec, "source", None) if isinstance(spec, trust.StoredSpec) else None
    return os.path.dirname(os.path.abspath(source)) if isinstance(source, str) and source else None


@contextlib.contextmanager
def _factory_path(near: str | None = None) -> Iterator[None]:
    """Where a factory's module is looked up: the working directory first, ``near`` (the run file's folder) last.

    The working directory goes first, as ``python -m`` puts it; the run file's folder goes last, so it
    only finds a module nothing else provides. Only for a factory already found trusted (its callers
    check first); both are removed again afterwards.
    """
    added: list[str] = []
    cwd = os.getcwd()
    for folder, first in ((cwd, True), (near, False)):
        if folder is None or any(os.path.abspath(p or os.curdir) == folder for p in sys.path):
            continue
        if first:
            sys.path.insert(0, folder)
        else:
            sys.path.append(folder)
        added.append(folder)
    try:
        yield
    finally:
        for folder in added:
            if folder in sys.path:
                sys.path.remove(folder)


def _run(fn: Callable[..., Any], kwargs: dict[str, Any], canon: Mapping[str, Any], kind: str) -> Any:
    """``fn(**kwargs)``, any failure turned into one UserError line naming the builder."""
    try:
        return fn(**kwargs)
    except UserError:
        raise  # the factory's own one-line message
    except (TypeError, ValueError) as err:
        raise UserError(f"{kind} {_label(canon)} rejected its kwargs: {err}") from err
    except Exception as err:  # a factory is the user's code: name it and what it raised, in one line
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{kind} {_label(canon)} failed while building: {type(err).__name__}"
                        f"{': ' + first if first else ''}; fix the factory or its kwargs") from err


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's (CPU), numpy's and Python's global RNGs inside the block; restore them after."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
