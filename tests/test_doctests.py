"""The examples in the docstrings of the curvature operators, the estimators and the public API run and pass.

Every module of lossatlas.curvature and lossatlas.estimators, and lossatlas.api, is run through
``doctest.testmod``. A public module that defines a public function or class must hold at least one
example, so the examples cannot silently vanish.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest
import torch

PACKAGES = ("lossatlas.curvature", "lossatlas.estimators")
MODULES = ("lossatlas.api",)


def _module_names() -> list[str]:
    names = list(MODULES)
    for package in PACKAGES:
        names.append(package)
        path = importlib.import_module(package).__path__
        names += [f"{package}.{m.name}" for m in pkgutil.iter_modules(path)]
    return sorted(names)


def _defines_public_api(module) -> bool:
    """Whether a public module defines (not imports) a public function or class."""
    if any(part.startswith("_") for part in module.__name__.split(".")):
        return False
    return any(
        (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module.__name__
        for name, obj in vars(module).items()
        if not name.startswith("_")
    )


def test_the_modules_are_found():
    names = _module_names()
    assert {"lossatlas.api", "lossatlas.curvature.hessian", "lossatlas.estimators.lanczos",
            "lossatlas.estimators.trace"} <= set(names)


@pytest.mark.parametrize("name", _module_names())
def test_docstring_examples_pass(name):
    module = importlib.import_module(name)
    torch.manual_seed(0)  # examples drawing random data without a generator see the same numbers every run
    outcome = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False, report=True)
    assert outcome.failed == 0, f"{name}: {outcome.failed} of {outcome.attempted} examples failed (see stdout)"
    if _defines_public_api(module):
        assert outcome.attempted > 0, f"{name} defines public functions or classes but holds no docstring example"
