"""The kinds of results that ``plot``, ``report`` and ``demo`` show, read from the probes' own declarations.

A kind is "training" (the run's per-step log) or the name of a registered probe that declares a ``figure``.
Each probe class says, once, its report ``section``, its ``title``, its ``figure`` (a name viz draws) and the
``usage`` of the command that stores its results; a result of an unregistered probe goes to the "other"
section, headed by its name, drawn as every stored scalar vs step.
"""

from __future__ import annotations

from lossatlas.probes.catalog import declared  # the probes' declarations without importing them (nor torch)
from lossatlas.viz.registry import TRAINING
from lossatlas.viz.report import SECTIONS

OTHER = "other"


def plot_kinds() -> tuple[str, ...]:
    """The kinds ``lossatlas plot`` draws: "training", then each registered probe with a figure.

    The probes come in report-section order (registration order within a section).
    """
    order = {name: i for i, name in enumerate(SECTIONS)}
    drawn = [cls for cls in declared().values() if cls.figure is not None]
    return (TRAINING, *(cls.name for cls in sorted(drawn, key=lambda c: order.get(c.section, len(order)))))


def check_kind(kind: str) -> str:
    """``kind`` if ``lossatlas plot`` draws it; ValueError listing the kinds otherwise."""
    kinds = plot_kinds()
    if kind not in kinds:
        raise ValueError(f"unknown figure kind {kind!r}; known kinds: {', '.join(kinds)}")
    return kind


def figure_of(kind: str) -> str:
    """The viz figure name that draws ``kind`` (the kind itself when no registered probe declares one)."""
    cls = declared().get(kind)
    return cls.figure if cls is not None and cls.figure is not None else kind


def section_of(probe: str) -> str:
    """The report section of ``probe``'s results ("other" for an unregistered probe)."""
    cls = declared().get(probe)
    return cls.section if cls is not None else OTHER


def title_of(probe: str) -> str:
    """The heading of ``probe``'s results in the report."""
    cls = declared().get(probe)
    return (cls.title if cls is not None else "") or probe


def command_of(probe: str) -> str:
    """The command that stores ``probe``'s results (what the user runs when they are missing), RUN for the run."""
    usage = declared()[probe].usage
    return f"lossatlas {probe} RUN {usage}" if usage else f"lossatlas {probe} RUN"
