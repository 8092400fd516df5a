"""The one check of a setting against its allowed choices, with one message everywhere.

``check_choice("loss", "mes", ("mse", "ce"))`` raises
``ValueError("unknown loss 'mes'; choose one of mse, ce")``. User-facing callers pass
``error=UserError`` (from :mod:`lossatlas.errors`) and put a flag hint in ``name``: ``"loss (--loss)"``.
"""

from __future__ import annotations

from typing import Any, Iterable, TypeVar

T = TypeVar("T")


def check_choice(
    name: str, value: T, choices: Iterable[Any], *, prefix: str = "", error: type[Exception] = ValueError
) -> T:
    """Return ``value`` if it is one of ``choices``, else raise ``error`` naming them.

    Message: ``f"{prefix}unknown {name} {value!r}; choose one of a, b, c"`` (choices joined by ``str``);
    ``prefix`` (e.g. ``"hessian: "``) says who refused it.
    """
    choices = tuple(choices)
    if value not in choices:
        raise error(f"{prefix}unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}")
    return value


__all__ = ["check_choice"]
