"""Old import paths and names that keep working for one release, each with a DeprecationWarning naming the new one.

A shim module at an old path calls ``moved(__name__)`` in its body and, for a plain module, puts
the new module in its place (``sys.modules[__name__] = ...``), so both paths give the same objects;
a shim package forwards attribute look-ups to the new package instead, since its old submodules
are shims of their own. A module that renamed a public name answers the old one from its module
``__getattr__`` with ``renamed(__name__, name)``.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Any

_ENGINE_MODULES = {
    "curvature": ("", ".base", ".blocks", ".fisher", ".ggn", ".hessian"),
    "estimators": ("", "._checks", "._recurrence", ".density", ".lanczos", ".trace"),
}

# old dotted path → new dotted path
MOVED: dict[str, str] = {
    **{f"lossatlas.probes.{pkg}{sub}": f"lossatlas.{pkg}{sub}" for pkg, subs in _ENGINE_MODULES.items() for sub in subs},
    "lossatlas.probes.batches": "lossatlas.batches",
    "lossatlas.probes.distributed": "lossatlas.distributed",
    "lossatlas.probes.losses": "lossatlas.losses",
    "lossatlas.probes.evaluate": "lossatlas.probes.loss",
}


def moved(old: str) -> ModuleType:
    """Warn that the module ``old`` is deprecated in favour of ``MOVED[old]``, and return the new module.

    The warning is attributed to the code that imported ``old`` (the import machinery's frames
    are skipped), so Python's default filters show it in a notebook or a script's ``__main__``.
    """
    new = MOVED[old]
    warnings.warn(f"{old} is deprecated: import {new} instead (the old path goes in the next release)",
                  DeprecationWarning, stacklevel=3)
    return importlib.import_module(new)


# old dotted name → new dotted name, for names renamed inside a module
RENAMED: dict[str, str] = {
    "lossatlas.viz.interpolation_figure": "lossatlas.viz.interpolate_figure",
    "lossatlas.viz.landscape.interpolation_figure": "lossatlas.viz.landscape.interpolate_figure",
    "lossatlas.probes.loss.LossAccuracy": "lossatlas.probes.loss.Loss",
}


def renamed(module: str, name: str) -> Any:
    """The object now called ``RENAMED[module.name]``, with a DeprecationWarning; AttributeError for other names.

    Meant as a module's ``__getattr__``: ``def __getattr__(name): return renamed(__name__, name)``.
    """
    old = f"{module}.{name}"
    if old not in RENAMED:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new_module, _, new_name = RENAMED[old].rpartition(".")
    warnings.warn(f"{old} is deprecated: use {RENAMED[old]} instead (the old name goes in the next release)",
                  DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(new_module), new_name)
