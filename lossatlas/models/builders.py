"""Models rebuilt from configuration only: Hugging Face Auto classes, timm and torchvision by name.

Specs (beside ``kwargs`` and ``seed``)::

    {"hf": {"auto_class": "AutoModelForCausalLM", "config": {"model_type": "gpt2", "n_layer": 2}}}
    {"timm": "resnet18", "kwargs": {"num_classes": 10}}
    {"torchvision": "resnet18", "kwargs": {"num_classes": 10}}

Safe by construction, so never in need of trust: the config is data passed to a library's own
builder, no user module is imported, no remote code runs (``trust_remote_code``/``auto_map`` are
refused) and no weights are downloaded (``pretrained``/``weights`` are refused). An HF model is
``AutoConfig.for_model(model_type, **rest)`` passed to the named ``AutoModel*`` class's
``from_config``, returned as-is (its forward returns a ModelOutput).
"""

from __future__ import annotations

import importlib
import json
import re
from typing import Any, Callable, Mapping

from torch import nn

from lossatlas.errors import UserError

KINDS: tuple[str, ...] = ("hf", "timm", "torchvision")
_AUTO_CLASS = re.compile(r"^AutoModel[A-Za-z0-9]*$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_REMOTE_KEYS = ("trust_remote_code", "auto_map")  # what would make transformers import code from a repository
_WEIGHT_KWARGS = {"timm": ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path"),
                  "torchvision": ("weights", "weights_backbone", "pretrained", "pretrained_backbone")}


def kind_of(spec: Mapping[str, Any]) -> str | None:
    """Which configuration-only builder a spec names (``"hf"``, ``"timm"``, ``"torchvision"``), or None."""
    found = [k for k in KINDS if k in spec]
    return found[0] if len(found) == 1 else None


def normalize(kind: str, value: Any, kwargs: Mapping[str, Any]) -> Any:
    """The canonical value of a spec's ``hf``/``timm``/``torchvision`` entry; UserError if malformed."""
    if kind != "hf":
        if not isinstance(value, str) or not _MODEL_NAME.match(value):
            raise UserError(f"spec {kind!r} must be a model name such as 'resnet18', got {value!r}")
        for key in _WEIGHT_KWARGS[kind]:
            if kwargs.get(key) not in (None, False):
                raise UserError(f"spec {kind!r} kwargs {key!r}: a spec builds from configuration only and downloads "
                                "no weights; drop it and load a checkpoint instead")
        return value
    if not isinstance(value, Mapping) or set(value) != {"auto_class", "config"}:
        raise UserError('spec "hf" must be {"auto_class": "AutoModelFor...", "config": {"model_type": ..., ...}}, '
                        f"got {json.dumps(value, default=str)[:120]}")
    auto_class, config = value["auto_class"], value["config"]
    if not isinstance(auto_class, str) or not _AUTO_CLASS.match(auto_class):
        raise UserError(f"spec hf 'auto_class' must name a transformers AutoModel class (e.g. 'AutoModelForCausalLM'), "
                        f"got {auto_class!r}")
    if not isinstance(config, Mapping) or not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise UserError("spec hf 'config' must be a dict with a 'model_type' (e.g. {\"model_type\": \"gpt2\"})")
    if kwargs:
        raise UserError(f"spec hf takes no kwargs (got {', '.join(sorted(kwargs))}); put them in hf 'config'")
    for key in _REMOTE_KEYS:
        if _holds_key(value, key):
            raise UserError(f"spec hf holds {key!r}: lossatlas never runs a repository's remote code; give a "
                            "'model_type' that transformers itself implements")
    try:
        return json.loads(json.dumps({"auto_class": auto_class, "config": dict(config)}))
    except (TypeError, ValueError) as err:
        raise UserError(f"spec hf 'config' must hold only JSON values: {err}") from None


def _holds_key(value: Any, key: str) -> bool:
    if isinstance(value, Mapping):
        return key in value or any(_holds_key(v, key) for v in value.values())
    if isinstance(value, list):
        return any(_holds_key(v, key) for v in value)
    return False


def label(canon: Mapping[str, Any]) -> str:
    """A short name for messages: ``'hf AutoModelForCausalLM(gpt2)'``, ``'timm resnet18'``."""
    kind = kind_of(canon)
    if kind == "hf":
        return f"'hf {canon['hf']['auto_class']}({canon['hf']['config']['model_type']})'"
    return f"'{kind} {canon[kind]}'"


def _library(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"this spec needs {name}, which is not installed; pip install {name}") from None
    except RuntimeError as exc:  # a wheel built for another torch: its C++ operators fail to register
        import torch

        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"this spec needs {name}, which does not work with the installed torch {torch.__version__} "
                        f"({first}); install the {name} build made for this torch") from None


def resolve(canon: Mapping[str, Any]) -> Callable[..., nn.Module]:
    """The builder of a canonical configuration-only spec: a callable taking the spec's kwargs."""
    kind = kind_of(canon)
    if kind == "hf":
        return lambda: _build_hf(canon["hf"]["auto_class"], canon["hf"]["config"])
    name = canon[kind]
    if kind == "timm":
        timm = _library("timm")
        if not timm.is_model(name):
            raise UserError(f"timm has no model {name!r}; see timm.list_models()")
        return lambda **kwargs: timm.create_model(name, pretrained=False, **kwargs)
    tv_models = _library("torchvision").models
    if name not in tv_models.list_models():
        raise UserError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
    return lambda **kwargs: tv_models.get_model(name, weights=None, **kwargs)


def _build_hf(auto_class: str, config: Mapping[str, Any]) -> nn.Module:
    transformers = _library("transformers")
    cls = getattr(transformers, auto_class, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise UserError(f"transformers has no Auto class {auto_class!r}; e.g. AutoModelForCausalLM, "
                        "AutoModelForSequenceClassification, AutoModel")
    rest = {k: v for k, v in config.items() if k != "model_type"}
    try:
        cfg = transformers.AutoConfig.for_model(config["model_type"], **rest)
    except ValueError as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise UserError(f"transformers cannot configure model_type {config['model_type']!r}: {first}") from None
    return cls.from_config(cfg, trust_remote_code=False)
