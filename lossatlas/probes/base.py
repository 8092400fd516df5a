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
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from lossatlas.checks import check_choice

if TYPE_CHECKING:  # torch is imported where a context is built, so that Result and the probe table stay torch-free
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

    def add(self, name: str, value: Any, dims: Sequence[str] = (),
            coords: Mapping[str, Any] | None = None) -> "Result":
        """Store ``value`` as ``name``, its axes named by ``dims``; returns the Result.

        ``value`` is an array, or a number for a 0-d value; ``coords`` maps any of those axes to its
        coordinate array. ValueError for a name added twice, ``dims`` that do not match the array's axes, or a coordinate
        whose length is not its axis's (or that differs from one the axis already has).
        """
        if name in self.values:
            raise ValueError(f"Result {self.probe!r}: value {name!r} is added twice")
        arr, dims = np.asarray(value), tuple(dims)
        if len(dims) != arr.ndim:
            raise ValueError(f"Result {self.probe!r}: value {name!r} has {arr.ndim} axes but dims {dims}")
        for dim, c in (coords or {}).items():
            if dim not in dims:
                raise ValueError(f"Result {self.probe!r}: coordinate {dim!r} labels no axis of {name!r} {dims}")
            if np.asarray(c).shape != (arr.shape[dims.index(dim)],):
                raise ValueError(f"Result {self.probe!r}: coordinate {dim!r} has shape {np.asarray(c).shape} but "
                                 f"axis {dim!r} of {name!r} has {arr.shape[dims.index(dim)]} points")
        self.values[name], self.dims[name] = arr, dims
        for dim, c in (coords or {}).items():
            self.add_coord(dim, c)
        return self

    def add_coord(self, dim: str, values: Any) -> "Result":
        """Label the axis ``dim`` (of every value that has it) with ``values``; returns the Result.

        ValueError if the axis already has other coordinates.
        """
        arr = np.asarray(values)
        known = self.coords.get(dim)
        if known is not None and not (known.shape == arr.shape and np.array_equal(known, arr)):
            raise ValueError(f"Result {self.probe!r}: axis {dim!r} already has other coordinates")
        self.coords[dim] = arr
        return self



def _torch():
    """torch, imported on first use (reading Results and the probe table never needs it)."""
    import torch

    return torch


def _single_process() -> "Distributed":
    """The default ``ProbeContext.dist``: one process (imports torch.distributed on first use)."""
    from lossatlas.distributed import Distributed

    return Distributed()


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
    device: torch.device = field(default_factory=lambda: _torch().device("cpu"))
    dtype: torch.dtype | None = None
    progress: Callable[[int, int], None] | None = None
    partial: Result | None = None  # a stored partial result to resume from (surfaces)
    save_partial: Callable[[Result], None] | None = None  # a probe may hand back partial results
    steps: Sequence[int] = ()  # every checkpoint step of the run
    state_at: Callable[[int], dict[str, Tensor]] | None = None  # the state_dict at another step
    model_of_run: Callable[[str, int], nn.Module] | None = None  # another run file's model at a step (similarity)
    seed: int = 0
    dist: "Distributed" = field(default_factory=lambda: _single_process())  # rank and world size under torchrun


class Probe:
    """Base class of every probe: a frozen, keyword-only dataclass of settings.

    Subclasses are declared ``@register_probe`` + ``@dataclass(frozen=True, kw_only=True)``, set
    ``name``, validate their fields in ``validate()`` (raise ``ValueError`` with a fixable
    message) and implement ``run``, building their Result with ``new_result`` and ``Result.add``.
    Everything the runner, the CLI, plot and report ask of a probe class is declared here, with its
    default; a subclass overrides what differs:

    - ``name``, ``summary``: the registry and CLI name, and its one-line help;
    - ``section``, ``title``, ``figure``, ``usage``: how its results are shown (report section, heading,
      viz figure, the typical command that stores them);
    - ``splits_work``: under torchrun, every rank runs every checkpoint and the probe splits its own
      work through ``ctx.dist``; otherwise the runner deals the checkpoints out across ranks;
    - ``needs_optimizer_state``: the runner loads the checkpoint's optimizer state into
      ``ctx.optimizer_state`` (only then: it can be as large as the model, twice);
    - ``needs_data``: False for a data-free probe: the runner builds no data set (``ctx.data`` is empty);
    - ``part_of``, ``switch``: a probe that also runs as a part of another (``parts``) names that
      probe, whose figure and report item show its results, and the owner's boolean setting that
      turns it on there (None: the part has its own settings there, e.g. ``blocks``);
    - ``part_fields``: this probe's settings that only configure its parts: they keep their defaults in
      ``config()`` and the cache key, since each part's own config and key hold them.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    splits_work: ClassVar[bool] = False  # True: under torchrun the probe splits its work through ctx.dist
    needs_optimizer_state: ClassVar[bool] = False  # True: the runner loads ctx.optimizer_state
    needs_data: ClassVar[bool] = True  # False: the probe reads only the weights; the runner loads no data
    section: ClassVar[str] = "other"  # the report section of its results (a key of lossatlas.viz.report.SECTIONS)
    title: ClassVar[str] = ""  # the heading of its results in the report ("": the probe's name)
    figure: ClassVar[str | None] = None  # the viz figure name that draws its results (None: every scalar vs step)
    usage: ClassVar[str] = "--steps all"  # the options of a typical `lossatlas NAME RUN ...` that stores its results
    part_of: ClassVar[str | None] = None  # the probe this one is a part of (shown with its results)
    switch: ClassVar[str | None] = None  # the owner's boolean setting that turns this part on
    part_fields: ClassVar[tuple[str, ...]] = ()  # settings of this probe's parts (their defaults in config())

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` when a setting is out of range."""

    def run(self, ctx: ProbeContext) -> Result:  # pragma: no cover - abstract
        """The probe's Result at the context's checkpoint (with its parts' merged in)."""
        raise NotImplementedError

    def parts(self) -> tuple["Probe", ...]:
        """The other probes this one runs with these settings (none by default).

        Each is stored and cached under its own name and key: ``run`` returns
        ``merge(run_own(ctx), [part.run(ctx) ...])``, while the runner runs, stores and reuses each of
        them alone, so a changed part setting recomputes that part only.
        """
        return ()

    def run_own(self, ctx: ProbeContext) -> Result:
        """This probe's own Result, without its parts' (what the runner stores under its key): ``run`` by default."""
        return self.run(ctx)

    @classmethod
    def merge(cls, own: Result, parts: Sequence[Result]) -> Result:
        """One Result of this probe: ``own`` with every part's values, coordinates and metadata added.

        ``own`` itself when there are no parts. The config is ``own``'s with each part's settings among ``part_fields`` (and the part's ``switch``
        set True), so it lists what was asked; a metadata key ``own`` lacks or holds as None comes from the
        first part that has it, "matvecs" adds up every part's products and "elapsed_s" joins the timings.
        """
        if not parts:
            return own
        out = Result(probe=own.probe, config=dict(own.config), step=own.step, values=dict(own.values),
                     dims=dict(own.dims), coords=dict(own.coords), meta=dict(own.meta))
        for part in parts:
            out.config.update({k: v for k, v in part.config.items() if k in cls.part_fields})
            switch = PROBES[part.probe].switch if part.probe in PROBES else None
            if switch is not None:
                out.config[switch] = True
            for name, arr in part.values.items():
                dims = part.dims[name]
                out.add(name, arr, dims, {d: part.coords[d] for d in dims if d in part.coords})
            for key, value in part.meta.items():
                if key == "matvecs":
                    out.meta[key] = int(out.meta.get(key) or 0) + int(value or 0)
                elif key == "elapsed_s":
                    out.meta[key] = _join_elapsed(out.meta.get(key), value)
                elif out.meta.get(key) is None:
                    out.meta[key] = value
        return out

    def new_result(self, step: int | None, meta: Mapping[str, Any] | None = None) -> Result:
        """An empty Result of this probe (its name and ``config()``) at ``step``: fill it with ``Result.add``."""
        return Result(probe=self.name, config=self.config(), step=step, values={}, meta=dict(meta or {}))

    def config(self) -> dict:
        """The settings as a JSON-able dict (what is hashed and stored with the result).

        ``part_fields`` are given at their defaults: each part's own config holds them.
        """
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name in self.part_fields:
                value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out[f.name] = _jsonable(value)
        return out

    def config_hash(self) -> str:
        """A short, stable hash of ``name`` and ``config()``: the results-file key."""
        blob = json.dumps({"probe": self.name, "config": self.config()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _join_elapsed(a: Any, b: Any) -> Any:
    """Two timings as one: dicts of seconds joined, numbers added."""
    if isinstance(a, dict) or isinstance(b, dict):
        return {**(a if isinstance(a, dict) else {}), **(b if isinstance(b, dict) else {})}
    return float(a or 0.0) + float(b or 0.0)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    torch = sys.modules.get("torch")  # a torch dtype can only be here once torch is imported
    if torch is not None and isinstance(value, torch.dtype):
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
    return PROBES[check_choice("probe", name, sorted(PROBES))]
