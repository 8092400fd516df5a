"""Reference architectures, no-download data sets, and the registry that rebuilds them from a JSON spec."""

# Importing the architecture and data-set modules registers their builders.
from lossatlas.models import datasets  # noqa: F401  (registers the data sets)
from lossatlas.models.cnn import CNN
from lossatlas.models.gpt import GPT, GPTConfig
from lossatlas.models.mlp import MLP
from lossatlas.models.modular_mlp import ModularMLP
from lossatlas.models.registry import (
    DATASETS,
    MODELS,
    build_data,
    build_model,
    check_builder,
    limit_data_spec,
    normalize_spec,
    register_data,
    register_model,
    spec_fingerprint,
)
from lossatlas.models.resnet import ResNet

__all__ = [
    # registry
    "DATASETS",
    "MODELS",
    "build_data",
    "build_model",
    "check_builder",
    "limit_data_spec",
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
