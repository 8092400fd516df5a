"""A run file in a notebook: ``lossatlas.open_run("run.h5")`` gives a ``Run`` that reads the run and runs probes on it.

Example::

    run = lossatlas.open_run("run.h5")
    run.steps                                   # checkpoint steps, e.g. [0, 50, ..., 300]
    run.log["loss"]                             # the per-step training log (numpy arrays)
    top = run.hessian(top_k=5)                  # one Result: the last checkpoint's top-5 Hessian eigenvalues
    top.values["top_eigenvalues"]
    over_time = run.hessian(top_k=1, steps="all")  # a list of Results, one per checkpoint
    run.probe("sharpness", steps="all")         # any registered probe, by its name
    run.results("hessian")                      # what is stored in the results file

Probes run in this process through ``lossatlas.analysis.runner.run_probe``, exactly as the command line runs them:
results are stored in (and reused from) the run's results file, so a second call with the same settings reads them
back. Reading the run (``steps``, ``log``, ``results``) imports no torch; the first probe does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from lossatlas.errors import UserError

if TYPE_CHECKING:
    from lossatlas.analysis.runner import RunOptions
    from lossatlas.probes.base import Result
    from lossatlas.store import ResultsStore, RunReader

# the keyword arguments of a probe method that set how it runs (lossatlas.analysis.runner.RunOptions), not the probe:
# the same split as the command line's common options. A probe setting of the same name is passed as
# "<probe>_<name>" (e.g. collapse_batch_size=), as its command-line flag is --<probe>-<name>.
RUN_OPTIONS: tuple[str, ...] = ("data", "model", "trust_factory", "batch_size", "max_examples", "max_tokens", "dtype",
                                "device", "force", "progress", "allow_nonfinite", "output", "loss", "results_path")
STEPS_ONE = ("last", "first")  # step selections that name one checkpoint: a probe method returns one Result


class Run:
    """A run file and its results file, with one method per probe.

    Args:
        path: the run file (.h5) written by ``lossatlas train``, the Recorder or ``lossatlas import``.
        results_path: its results file (default: ``RUN.results.h5`` next to it, as the command line uses).

    Raises:
        UserError: the file is missing or not a lossatlas run file.
    """

    def __init__(self, path: str | Path, *, results_path: str | Path | None = None) -> None:
        from lossatlas.store import RunReader, default_results_path, file_kind

        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"{self.path}: no such run file; check the path (make one with `lossatlas train`)")
        if file_kind(self.path) != "run":
            raise UserError(f"{self.path} is a results file, not a run; open the run it belongs to "
                            "(RUN.h5 beside RUN.results.h5)")
        self.results_path = Path(results_path) if results_path is not None else default_results_path(self.path)
        self._reader: RunReader = RunReader(self.path)

    def __repr__(self) -> str:
        steps = self.steps
        span = f"steps {steps[0]}…{steps[-1]}" if steps else "no checkpoints"
        return f"Run({str(self.path)!r}: {len(steps)} checkpoints, {span})"

    # -- reading (no torch) ----------------------------------------------------------------------------------------
    @property
    def reader(self) -> "RunReader":
        """The ``lossatlas.store.RunReader`` of the file (specs, checkpoints as tensors, verification)."""
        return self._reader

    @property
    def steps(self) -> list[int]:
        """The steps of the stored checkpoints, in increasing order (read anew: a live run grows)."""
        return self._reader.steps()

    @property
    def log(self) -> dict[str, np.ndarray]:
        """The per-step training log: ``{"step": (N,), name: (N,)}``, NaN where a name was not logged."""
        return self._reader.log()

    @property
    def model_spec(self) -> Any:
        """The model spec stored with the run (what the probes build the model from)."""
        return self._reader.model_spec

    @property
    def data_spec(self) -> Any:
        """The data spec stored with the run (what the probes evaluate on, unless ``data=`` says otherwise)."""
        return self._reader.data_spec

    def _store(self) -> "ResultsStore | None":
        from lossatlas.store import ResultsStore

        if not self.results_path.exists():
            return None
        return ResultsStore(self.results_path, mode="r", run_fingerprint=self._reader.fingerprint())

    def results(self, probe: str | None = None, *, key: str | None = None) -> list["Result"]:
        """Stored Results, read from the results file (no computation).

        Args:
            probe: a probe name: its Results under one configuration, in step order; None: every stored Result,
                ordered by probe, configuration key and step.
            key: the configuration key (as ``lossatlas info RUN.results.h5`` lists them); default: the
                configuration of ``probe`` written most recently.

        Returns:
            The Results; empty when none is stored.

        Raises:
            UserError: ``key`` is given and ``probe`` has no results under it.
        """
        results = self._store()
        if results is None:
            if key is not None:
                raise UserError(f"{self.results_path}: no results file yet; run a probe first (e.g. run.hessian())")
            return []
        entries = results.entries(probe)
        if probe is not None:
            keys = {e["key"] for e in entries}
            if key is None and keys:
                key = max(entries, key=lambda e: e["written_at"])["key"]  # the newest configuration
            elif key is not None and key not in keys:
                have = ", ".join(sorted(keys)) or "none"
                raise UserError(f"no {probe!r} results under key {key!r} (stored keys: {have}); "
                                "pick one of those, or omit key= for the newest")
            entries = [e for e in entries if e["key"] == key]
        entries.sort(key=lambda e: (e["probe"], e["key"], -1 if e["step"] is None else e["step"]))
        out = []
        for e in entries:
            found = results.read(e["probe"], e["key"], e["step"])
            if found is not None:
                out.append(found[0])
        return out

    # -- probes (import torch on first use) -----------------------------------------------------------------------
    def probe(self, name: str, *, steps: str | int | Sequence[int] = "last", **settings: Any) -> "Result | list[Result]":
        """Run the probe called ``name`` on the selected checkpoints, in this process, and store its Results.

        A stored Result with the same settings on the same data is read back instead of recomputed (pass
        ``force=True`` to recompute), as ``lossatlas NAME RUN`` does.

        Args:
            name: a registered probe ("hessian", "surface", "loss", "sharpness", "interpolate", "collapse", ...).
            steps: "last" (default), "first", "all", a step, a list of steps, or a range "start:stop:stride".
            **settings: the probe's settings (its dataclass fields, e.g. ``top_k=5``), and how to run it: ``data``,
                ``model``, ``batch_size`` (256), ``max_examples``, ``max_tokens``, ``dtype``, ``device`` ("cpu"),
                ``force``, ``loss``, ``output``, ``allow_nonfinite``, ``trust_factory``, ``progress``
                (``lossatlas.analysis.runner.RunOptions``). A probe setting named like one of those is passed as
                ``<probe>_<name>`` (e.g. ``collapse_batch_size=512``), as on the command line.

        Returns:
            One Result when ``steps`` names one checkpoint (a step, "last" or "first"), else a list of Results in
            step order.

        Raises:
            UserError: an unknown probe or setting, or a setting the probe refuses.
        """
        from lossatlas.analysis.runner import RunOptions, run_probe

        cls = _probe_class(name)
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        probe_kwargs, option_kwargs = {}, {}
        for k, v in settings.items():
            if k.startswith(f"{name}_") and k[len(name) + 1:] in fields and k[len(name) + 1:] in RUN_OPTIONS:
                probe_kwargs[k[len(name) + 1:]] = v  # the probe's own setting that shares a run option's name
            elif k in RUN_OPTIONS:
                option_kwargs[k] = v
            elif k in fields:
                probe_kwargs[k] = v
            else:
                known = sorted(fields - set(RUN_OPTIONS)) + sorted(RUN_OPTIONS)
                raise UserError(f"probe {name!r} has no setting {k!r}; use one of: {', '.join(known)}")
        try:
            probe = cls(**probe_kwargs)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, UserError):
                raise
            raise UserError(f"probe {name!r}: {exc}") from None
        options: RunOptions = RunOptions(steps=_steps_spec(steps), **option_kwargs)
        if options.results_path is None:
            options.results_path = self.results_path
        report = run_probe(self.path, probe, options)
        results = report.results
        return results[0] if _one_step(steps) and len(results) == 1 else results

    def hessian(self, top_k: int = 5, *, steps: str | int | Sequence[int] = "last", **settings: Any) -> "Result | list[Result]":
        """The Hessian probe: the top ``top_k`` eigenvalues (default 5) by Lanczos, and whatever ``settings`` add.

        ``trace=True`` adds tr(H) (Hutchinson / Hutch++ / XTrace), ``density=True`` the SLQ spectral density,
        ``blocks="layers"`` per-layer spectra (lossatlas.probes.hessian.HessianProbe lists every setting). See
        ``probe`` for ``steps``, the run options and what is returned.
        """
        return self.probe("hessian", steps=steps, top_k=top_k, **settings)

    def surface(self, *, steps: str | int | Sequence[int] = "last", **settings: Any) -> "Result | list[Result]":
        """The loss surface on a 1-D or 2-D slice through a checkpoint (lossatlas.probes.surface.Surface).

        Li, Xu, Taylor, Studer, Goldstein 2018, "Visualizing the Loss Landscape of Neural Nets": filter-normalised
        random directions by default. See ``probe`` for ``steps``, the run options and what is returned.
        """
        return self.probe("surface", steps=steps, **settings)

    def loss(self, *, steps: str | int | Sequence[int] = "last", **settings: Any) -> "Result | list[Result]":
        """The loss (and accuracy) of a checkpoint on the run's data (lossatlas.probes.loss.Loss).

        See ``probe`` for ``steps``, the run options and what is returned.
        """
        return self.probe("loss", steps=steps, **settings)


def _probe_class(name: str) -> type:
    import lossatlas.probes.registry  # noqa: F401  (registers every built-in probe; imports torch)
    from lossatlas.probes import PROBES

    cls = PROBES.get(name)
    if cls is None:
        raise UserError(f"unknown probe {name!r}; use one of: {', '.join(sorted(PROBES))}")
    return cls


def _steps_spec(steps: Any) -> Any:
    """A step selection as ``RunOptions.steps`` takes it (one int as a one-element list)."""
    if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
        return [int(steps)]
    return steps


def _one_step(steps: Any) -> bool:
    """Whether ``steps`` names exactly one checkpoint (then a probe method returns one Result)."""
    if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
        return True
    return isinstance(steps, str) and steps.strip().lower() in STEPS_ONE


def open_run(path: str | Path, *, results_path: str | Path | None = None) -> Run:
    """The ``Run`` of the run file ``path``: its steps, log and stored results, and a method per probe.

    ``results_path`` defaults to ``RUN.results.h5`` next to the run. Opening imports no torch.
    """
    return Run(path, results_path=results_path)


__all__ = ["Run", "open_run", "RUN_OPTIONS"]
