"""Non-finite numbers said plainly: checkpoints holding NaN/inf are named, JSON never holds NaN/inf.

- ``check_finite(state, where)`` raises ``NonFiniteError`` naming the tensors with NaN/±inf entries
  and how many, so no probe computes on a diverged checkpoint by accident.
- ``strict_json(obj)`` writes every NaN/±inf number as ``null`` and lists where each one was under
  the top-level member ``"nonfinite"``: a map from the value's JSON Pointer (RFC 6901, e.g.
  ``/steps/0/values/lambda_max``) to ``"nan"``, ``"inf"`` or ``"-inf"``. The text is produced with
  ``allow_nan=False``, so a number that escapes the cleaning raises instead of printing ``NaN``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

from lossatlas.errors import NonFiniteError

ALLOW_HINT = "pass --allow-nonfinite to compute on it anyway"


class NonFiniteWarning(UserWarning):
    """A checkpoint holds NaN or inf values (it was read anyway)."""


def nonfinite_counts(state: Mapping[str, Any]) -> dict[str, int]:
    """``{name: number of NaN/±inf entries}`` for each floating-point tensor that has any."""
    import torch

    counts: dict[str, int] = {}
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                counts[name] = bad
    return counts


def describe_nonfinite(counts: Mapping[str, int], limit: int = 5) -> str:
    """``"12 non-finite values (fc1.weight: 12)"``: the total and the first ``limit`` tensors."""
    total = sum(counts.values())
    names = ", ".join(f"{n}: {c}" for n, c in list(counts.items())[:limit])
    more = f", … {len(counts) - limit} more tensors" if len(counts) > limit else ""
    return f"{total} non-finite value{'s' if total != 1 else ''} ({names}{more})"


def check_finite(state: Mapping[str, Any], where: str, *, hint: str = ALLOW_HINT) -> None:
    """Raise ``NonFiniteError`` if any floating tensor of ``state`` holds NaN/±inf.

    ``where`` names the checkpoint, e.g. ``"run.h5: checkpoint at step 300"``; the message reads
    ``"run.h5: checkpoint at step 300 holds 12 non-finite values (fc1.weight: 12); <hint>"``.
    """
    counts = nonfinite_counts(state)
    if counts:
        raise NonFiniteError(f"{where} holds {describe_nonfinite(counts)}; {hint}")


def _kind(v: float) -> str:
    return "nan" if v != v else ("inf" if v > 0 else "-inf")


def _pointer_token(key: Any) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def strict(obj: Any) -> tuple[Any, dict[str, str]]:
    """``(clean, nonfinite)``: ``obj`` with NaN/±inf replaced by None, and the JSON Pointer → kind of each.

    Numpy scalars and arrays become Python numbers and lists; tuples become lists; keys become strings.
    """
    found: dict[str, str] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, Mapping):
            return {str(k): walk(v, f"{path}/{_pointer_token(k)}") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(x)]
        if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy arrays and scalars, 0-d tensors
            return walk(x.tolist(), path)
        if isinstance(x, float) and not math.isfinite(x):
            found[path] = _kind(x)
            return None
        return x

    return walk(obj, ""), found


def strict_json(obj: Mapping[str, Any], **kwargs: Any) -> str:
    """JSON text of the dict ``obj`` with NaN/±inf as null and their places under ``"nonfinite"``.

    Other objects are written with ``str`` (``default``), as paths are.
    """
    clean, found = strict(obj)
    clean["nonfinite"] = found
    kwargs.setdefault("default", str)
    return json.dumps(clean, allow_nan=False, **kwargs)


__all__ = ["check_finite", "nonfinite_counts", "describe_nonfinite", "strict", "strict_json", "NonFiniteWarning",
           "ALLOW_HINT"]
