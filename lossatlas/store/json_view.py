"""The one JSON schema of a stored result, used by every ``--json`` of the command line.

``result_json(result)`` gives::

    {"probe": "hessian", "key": "6fd2f6d1cae8", "label": "hessian · top_k=2", "name": null, "step": 20,
     "values": {"top_eigenvalues": {"dims": ["k"], "shape": [2], "data": [0.77, 0.71]}, ...},
     "coords": {"block": {"dims": ["block"], "shape": [3], "data": ["layers.0", ...]}, ...},
     "config": {...the probe's settings...}, "meta": {...how it was computed...}}

Every value and coordinate carries its dimension names, its shape and its numbers (nested lists in C order; a
0-d value's ``data`` is the number itself). A value along a parameter-space axis (dimension ``param``: a
direction or an eigenvector, as many numbers as the model has parameters) is summarised instead: ``data``
null and ``omitted`` saying how to read it (``lossatlas.open_results``). Non-finite numbers are made strict
JSON by ``lossatlas.finite.strict_json`` (null, with the member ``nonfinite`` naming each). This module
imports neither torch nor h5py.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

OMITTED_DIMS = ("param",)  # axes as long as the model's parameter vector: not printed


def array_json(arr: Any, dims: Sequence[str], omit: Sequence[str] = OMITTED_DIMS) -> dict:
    """``{"dims", "shape", "data"}`` of one array (``data`` null and ``omitted`` set along an omitted axis)."""
    a = np.asarray(arr)
    out: dict[str, Any] = {"dims": list(dims), "shape": list(a.shape)}
    if any(d in omit for d in dims):
        out["data"] = None
        out["omitted"] = (f"{a.size} numbers along {', '.join(d for d in dims if d in omit)}; read them with "
                          "lossatlas.open_results or from the results file")
        return out
    if a.dtype.kind == "c":  # complex numbers as [real, imaginary] pairs
        a = np.stack([a.real, a.imag], axis=-1)
    out["data"] = a.tolist()  # Python numbers, bools and strings; NaN/inf stay floats for strict_json
    return out


def result_json(result: Any, *, key: str | None = None, label: str | None = None, name: str | None = None,
                omit: Sequence[str] = OMITTED_DIMS, **extra: Any) -> dict:
    """A Result (``lossatlas.probes.Result`` or anything with its fields) in the schema of the module docstring.

    ``key``, ``label`` and ``name`` identify its configuration (``lossatlas.store.labels``); ``extra``
    members (e.g. ``status``) are added after ``step``.
    """
    coords = {}
    for dim, c in result.coords.items():
        c = np.asarray(c)
        coords[dim] = array_json(c, (dim,) if c.ndim == 1 else tuple(f"{dim}_dim{i}" for i in range(c.ndim)), omit)
    values = {n: array_json(v, result.dims.get(n, ()), omit) for n, v in result.values.items()}
    return {"probe": result.probe, "key": key, "label": label, "name": name, "step": result.step, **extra,
            "values": values, "coords": coords, "config": dict(result.config), "meta": _plain(result.meta)}


def _plain(obj: Any) -> Any:
    """The numpy scalars and arrays inside ``obj`` as Python numbers and lists."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
