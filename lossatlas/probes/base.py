"""The probe contract: a frozen dataclass of settings whose ``run(ctx)`` returns a ``Result``.

A probe is a pure computation on a model, its data and a loss. It never touches a file, never
calls ``.eval()``/``.train()`` on the user's module for good and never mutates its parameters:
it evaluates ``torch.func.functional_call`` on fresh parameter dicts. ``analysis`` applies probes
to a run's checkpoints; ``store`` writes their Results; ``viz`` draws them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lossatlas.distributed import Distributed


@dataclass(frozen=True)
class Result:
    """What a probe returns, the store writes and viz reads: labelled arrays plus metadata.

    ``values[name]`` is an array whose axes are named by ``dims[name]``; an axis that has a
    coordinate array lists it in ``coords``. Scalars are 0-d arrays with ``dims[name] == ()``.
    ``meta`` holds JSON-able facts: versions, dtype, device, seed, matvecs, elapsed_s, the HVP path
    that ran, standard errors.
    """

    probe: str
    config: dict
    step: int | None
    values: dict[str, np.ndarray]
    dims: dict[str, tuple[str, ...]] = field(default_factory=dict)
    coords: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, arr in list(self.values.items()):
            arr = np.asarray(arr)
            self.values[name] = arr
            dims = tuple(self.dims.get(name, tuple(f"{name}_dim{i}" for i in range(arr.ndim))))
            if len(dims) != arr.ndim:
                raise ValueError(f"Result {self.probe!r}: value {name!r} has {arr.ndim} axes but dims {dims}")
            self.dims[name] = dims
        for name, arr in list(self.coords.items()):
            self.coords[name] = np.asarray(arr)

    def scalar(self, name: str) -> float:
        """The value ``name`` as a Python float (it must hold one number)."""
        return float(np.asarray(self.values[name]).reshape(()))


@dataclass
class ProbeContext:
    """Everything a probe may use: the model, a fixed data set and the loss, at one checkpoint.

    ``data`` is a fixed, ordered sequence of ``(inputs, targets)`` batches; the loss over the data
    set is the example-weighted mean of the per-batch mean losses, Σ_b (n_b/N) L_b, the unequal last
    batch included. ``optimizer_state`` maps a parameter name to its optimizer state tensors
    (e.g. Adam's ``exp_avg_sq``); ``lr`` is the learning rate at this checkpoint when known.
    """

    model: nn.Module
    data: Sequence[tuple[Tensor, Tensor]]
    loss: str = "cross_entropy"
    step: int | None = None
    lr: float | None = None
    optimizer_state: Mapping[str, Mapping[str, Tensor]] | None = None
    optimizer: Mapping[str, Any] | None = None
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype | None = None
    progress: Callable[[int, int], None] | None = None
    partial: Result | None = None  # a stored partial result to resume from (surfaces)
    save_partial: Callable[[Result], None] | None = None  # a probe may hand back partial results
    steps: Sequence[int] = ()  # every checkpoint step of the run
    state_at: Callable[[int], dict[str, Tensor]] | None = None  # the state_dict at another step
    seed: int = 0
    dist: "Distributed" = field(default_factory=lambda: Distributed())  # rank and world size under torchrun


class Probe:
    """Base class of every probe: a frozen, keyword-only dataclass of settings.

    Subclasses are declared ``@register_probe`` + ``@dataclass(frozen=True, kw_only=True)``, set
    ``name``, validate their fields in ``validate()`` (raise ``ValueError`` with a fixable
    message) and implement ``run``. How its results are shown is declared here too, once:
    ``section``, ``title``, ``figure`` and ``usage``; plot, report, demo and the CLI read them.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    splits_work: ClassVar[bool] = False  # True: under torchrun the probe splits its work through ctx.dist
    section: ClassVar[str] = "other"  # the report section of its results (a key of lossatlas.viz.report.SECTIONS)
    title: ClassVar[str] = ""  # the heading of its results in the report ("": the probe's name)
    figure: ClassVar[str | None] = None  # the viz figure name that draws its results (None: every scalar vs step)
    usage: ClassVar[str] = "--steps all"  # the options of a typical `lossatlas NAME RUN ...` that stores its results

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` when a setting is out of range."""

    def run(self, ctx: ProbeContext) -> Result:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:
        """The settings as a JSON-able dict (what is hashed and stored with the result)."""
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    def config_hash(self) -> str:
        """A short, stable hash of ``name`` and ``config()``: the results-file key."""
        blob = json.dumps({"probe": self.name, "config": self.config()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return value


PROBES: dict[str, type[Probe]] = {}


def register_probe(cls: type[Probe]) -> type[Probe]:
    """Class decorator: make a probe reachable by its ``name`` from the runner and the CLI."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a class attribute `name`")
    if cls.name in PROBES and PROBES[cls.name] is not cls:
        raise TypeError(f"probe name {cls.name!r} is registered twice")
    PROBES[cls.name] = cls
    return cls


def get_probe(name: str) -> type[Probe]:
    """The registered probe class called ``name``; ValueError lists the known ones."""
    try:
        return PROBES[name]
    except KeyError:
        raise ValueError(f"unknown probe {name!r}; known probes: {', '.join(sorted(PROBES))}") from None
