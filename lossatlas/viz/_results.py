"""What viz reads from a Result without importing it (lossatlas.probes.base pulls in torch)."""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import numpy as np


class ResultLike(Protocol):
    """The fields of ``lossatlas.probes.base.Result`` that the figures use (numpy arrays only)."""

    probe: str
    config: dict
    step: int | None
    values: Mapping[str, np.ndarray]
    dims: Mapping[str, tuple[str, ...]]
    coords: Mapping[str, np.ndarray]
    meta: Mapping[str, Any]


def as_list(results: "ResultLike | Sequence[ResultLike]") -> list:
    """One Result or a sequence of them as a list sorted by step (None first)."""
    if hasattr(results, "values") and hasattr(results, "probe"):
        results = [results]
    out = list(results)
    if not out:
        raise ValueError("no results given; pass at least one Result")
    return sorted(out, key=lambda r: -1 if r.step is None else int(r.step))


def scalar(result: ResultLike, name: str) -> float | None:
    """The 0-d value ``name`` as a float, None when the result does not hold it."""
    v = result.values.get(name)
    if v is None:
        return None
    arr = np.asarray(v, dtype=np.float64)
    return float(arr.reshape(())) if arr.size == 1 else None


def array(result: ResultLike, name: str) -> np.ndarray | None:
    """The value ``name`` as a float64 array, None when absent or empty."""
    v = result.values.get(name)
    if v is None:
        return None
    arr = np.asarray(v, dtype=np.float64)
    return arr if arr.size else None


def coord(result: ResultLike, value: str, axis: int = 0) -> np.ndarray:
    """The coordinate of axis ``axis`` of value ``name`` (0, 1, 2, ... when the axis has none)."""
    dim = result.dims[value][axis]
    c = result.coords.get(dim)
    n = np.asarray(result.values[value]).shape[axis]
    return np.asarray(c) if c is not None and len(c) == n else np.arange(n)


def steps_of(results: Sequence[ResultLike]) -> np.ndarray:
    """The steps of ``results`` as floats (NaN for a step-less result)."""
    return np.array([np.nan if r.step is None else float(r.step) for r in results])


def series(results: Sequence[ResultLike], name: str) -> np.ndarray:
    """The scalar ``name`` of each result, NaN where it is missing: aligned with ``steps_of``."""
    return np.array([np.nan if (v := scalar(r, name)) is None else v for r in results])


def scalar_names(results: Sequence[ResultLike]) -> list[str]:
    """Names of 0-d values held by any of ``results``, in first-seen order."""
    names: dict[str, None] = {}
    for r in results:
        for k, v in r.values.items():
            if np.asarray(v).ndim == 0 and np.asarray(v).dtype.kind in "fiub":
                names.setdefault(k)
    return list(names)


def pick_step(results: Sequence[ResultLike], step: int | None) -> ResultLike:
    """The result at ``step`` (the last one when None); ValueError lists the stored steps."""
    if step is None:
        return results[-1]
    for r in results:
        if r.step == step:
            return r
    have = ", ".join(str(r.step) for r in results)
    raise ValueError(f"no {results[0].probe!r} result at step {step}; stored steps: {have}")
