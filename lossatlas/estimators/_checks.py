"""Input checks and seeded random draws shared by the estimators.

An operator is anything with ``shape == (P, P)``, ``dtype``, ``device`` and ``A @ V`` for
``V`` of shape ``(P,)`` or ``(P, K)``; a dense ``torch.Tensor`` qualifies.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from lossatlas.checks import check_choice

DISTRIBUTIONS: tuple[str, ...] = ("rademacher", "normal")


def check_operator(A: Any) -> tuple[int, torch.dtype, torch.device]:
    """Return ``(P, dtype, device)`` of a square operator, or raise ValueError saying what is missing."""
    for attr in ("shape", "dtype", "device"):
        if not hasattr(A, attr):
            raise ValueError(
                f"operator {type(A).__name__} has no `{attr}`; pass a torch.Tensor or an operator "
                "with shape (P, P), dtype, device and `A @ V`"
            )
    if not hasattr(A, "__matmul__"):
        raise ValueError(f"operator {type(A).__name__} does not support `A @ V`; implement __matmul__")
    shape = tuple(A.shape)
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 1:
        raise ValueError(f"operator must be square (P, P) with P >= 1, got shape {shape}; pass a square matrix")
    if not A.dtype.is_floating_point:
        raise ValueError(f"operator dtype must be floating point, got {A.dtype}; convert it with .double() or .float()")
    return int(shape[0]), A.dtype, torch.device(A.device)


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` as int if it is an integer >= ``minimum``, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive_float(name: str, value: Any) -> float:
    """Return ``value`` as float if it is a finite number > 0, else raise ValueError."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not (out > 0 and out < float("inf")):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return out


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (all random draws go through one)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return torch.Generator(device=device).manual_seed(seed)


def random_vectors(
    P: int, n: int, distribution: str, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``n`` random vectors as columns of a (P, n) tensor with E[v vᵀ] = I (Rademacher ±1 or standard normal)."""
    check_choice("distribution", distribution, DISTRIBUTIONS)
    if distribution == "rademacher":
        bits = torch.randint(0, 2, (P, n), generator=generator, device=device)
        return bits.to(dtype) * 2 - 1
    return torch.randn(P, n, generator=generator, dtype=dtype, device=device)


_MASK64 = 2**64 - 1


def _splitmix64(x: int) -> int:
    """One splitmix64 output for the state ``x`` (Steele, Lea & Flood 2014): a bijective 64-bit mix."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def probe_seed(seed: int, index: int, stream: int = 0) -> int:
    """The seed of global probe ``index``: splitmix64(splitmix64(splitmix64(seed) ⊕ stream) ⊕ index), 63 bits.

    Probe k is then the same vector whichever process draws it, so a probe set split across ranks
    is the single-process set (``stream`` separates e.g. start vectors from restart vectors).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    h = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ stream) ^ index)
    return h >> 1


def probe_vectors(
    P: int, indices: Iterable[int], distribution: str, seed: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Probe vectors number ``indices`` as columns of a (P, n) tensor, each from its own generator (:func:`probe_seed`).

    E[v vᵀ] = I (Rademacher ±1 or standard normal). Column j depends on (seed, indices[j]) only.
    """
    check_choice("distribution", distribution, DISTRIBUTIONS)
    indices = list(indices)
    rows = torch.empty(len(indices), P, dtype=dtype, device=device)  # (n, P): one contiguous row per probe
    gen = torch.Generator(device=device)
    for j, k in enumerate(indices):
        gen.manual_seed(probe_seed(seed, k))
        if distribution == "rademacher":
            rows[j].bernoulli_(0.5, generator=gen)  # 0 or 1, mapped to ±1 below
        else:
            rows[j].normal_(generator=gen)
    if distribution == "rademacher":
        rows.mul_(2).sub_(1)
    return rows.T


def apply(A: Any, V: Tensor) -> Tensor:
    """``A @ V`` for a (P, K) block, checked to come back with the same shape (K = 0: no product)."""
    if V.ndim == 2 and V.shape[1] == 0:
        return torch.zeros_like(V)
    out = A @ V
    if not isinstance(out, Tensor) or tuple(out.shape) != tuple(V.shape):
        got = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
        raise ValueError(f"operator returned {got} for input of shape {tuple(V.shape)}; `A @ V` must keep V's shape")
    return out
