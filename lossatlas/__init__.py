"""lossatlas: loss landscapes, Hessian spectra and training dynamics from PyTorch checkpoints.

In a notebook: ``lossatlas.hessian_spectrum(model, (x, y))``, ``lossatlas.surface(...)``, ... run one
measurement on a model and its data; ``Recorder`` writes a run file during training and
``run_probe`` applies a probe to its checkpoints. The names below are imported on first use, so
that ``import lossatlas`` (and ``lossatlas.viz``) stays free of torch until one is needed.
"""

from importlib import import_module

from lossatlas._version import __version__

_EXPORTS = {
    # recording: write a run file (checkpoints, metrics) while training
    "Recorder": "lossatlas.recorder",
    # analysis of a run: apply a probe to its checkpoints, with caching and resume
    "run_probe": "lossatlas.analysis.runner",
    "RunOptions": "lossatlas.analysis.runner",
    # plain functions: one measurement on a torch.nn.Module and its data, no file involved
    "loss": "lossatlas.api",
    "hessian_spectrum": "lossatlas.api",
    "sharpness": "lossatlas.api",
    "surface": "lossatlas.api",
    "interpolate": "lossatlas.api",
    "neural_collapse": "lossatlas.api",
    "uniformity": "lossatlas.api",
    # probes: the measurements behind both, and what they return
    "Probe": "lossatlas.probes.base",
    "ProbeContext": "lossatlas.probes.base",
    "Result": "lossatlas.probes.base",
    # a run in a notebook: its steps, log and stored results, and a method per probe (lossatlas.run)
    "open_run": "lossatlas.run",
    "Run": "lossatlas.run",
    # files: read a run, write one by hand, read stored results
    "RunReader": "lossatlas.store",
    "RunWriter": "lossatlas.store",
    "ResultsStore": "lossatlas.store",
    # stored results as xarray Datasets (the optional extra lossatlas[xarray]), imported on first use
    "open_results": "lossatlas.export",
    # errors: bad input, with a message that says how to fix it
    "UserError": "lossatlas.errors",
}

# engine modules: curvature operators (Hessian, GGN, Fisher products) and the estimators over them
# (Lanczos, SLQ density, Hutchinson / Hutch++ trace)
_MODULES = {
    "curvature": "lossatlas.curvature",
    "estimators": "lossatlas.estimators",
}

__all__ = ["__version__", *_EXPORTS, *_MODULES]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
    elif name in _MODULES:
        value = import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'lossatlas' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
