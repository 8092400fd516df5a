"""Deprecated path of :mod:`lossatlas.estimators` (same objects; the old path goes in the next release)."""

from lossatlas._moved import moved

_new = moved(__name__)
__all__ = list(_new.__all__)


def __getattr__(name: str):
    return getattr(_new, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(dir(_new)))
