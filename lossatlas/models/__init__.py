"""Reference architectures, no-download data sets, and the registry that rebuilds them from a JSON spec."""

from lossatlas.models.registry import (
    DATASETS,
    MODELS,
    build_data,
    build_model,
    normalize_spec,
    register_data,
    register_model,
    spec_fingerprint,
)

# Importing the modules registers their builders.
from lossatlas.models.mlp import MLP  # noqa: E402
from lossatlas.models.cnn import CNN  # noqa: E402
from lossatlas.models.resnet import ResNet  # noqa: E402
from lossatlas.models.gpt import GPT, GPTConfig  # noqa: E402
from lossatlas.models.modular_mlp import ModularMLP  # noqa: E402
from lossatlas.models import datasets  # noqa: E402,F401

__all__ = [
    # registry
    "DATASETS",
    "MODELS",
    "build_data",
    "build_model",
    "normalize_spec",
    "register_data",
    "register_model",
    "spec_fingerprint",
    # architectures
    "CNN",
    "GPT",
    "GPTConfig",
    "MLP",
    "ModularMLP",
    "ResNet",
]
