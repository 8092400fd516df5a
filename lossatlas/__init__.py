"""lossatlas: loss landscapes, Hessian spectra and training dynamics from PyTorch checkpoints.

The small public API, imported lazily so that ``lossatlas.viz`` stays free of torch; everything
else lives in the subpackages (``probes``, ``analysis``, ``viz``, ``models``) and in ``store``.
"""

from importlib import import_module

from lossatlas._version import __version__

_EXPORTS = {
    # recording and reading runs
    "Recorder": "lossatlas.recorder",
    "RunReader": "lossatlas.store",
    "RunWriter": "lossatlas.store",
    "ResultsStore": "lossatlas.store",
    # applying probes
    "Probe": "lossatlas.probes.base",
    "ProbeContext": "lossatlas.probes.base",
    "Result": "lossatlas.probes.base",
    "RunOptions": "lossatlas.analysis.runner",
    "run_probe": "lossatlas.analysis.runner",
    # errors
    "UserError": "lossatlas.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lossatlas' has no attribute {name!r}")
