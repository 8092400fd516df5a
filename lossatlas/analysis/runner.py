"""Apply a probe to a selection of a run's checkpoints, with caching, recomputation and resume.

For each selected step the runner rebuilds the model from the run's JSON spec, loads the
checkpoint, builds the data set and calls ``probe.run``. Each Result is stored in the results
file under ``/<probe>/<config hash>/<step>`` with the data fingerprint. A complete result with the
same config and data is reused (skipped); one with another data fingerprint is recomputed; a
partial one is handed back to the probe (``ctx.partial``) to resume.

``RunOptions.output`` (the model output the probes use, "logits" by default) and ``RunOptions.loss``
(a loss other than the run's own, e.g. "model": the model's own ``outputs.loss``) are recorded in
every result's meta ("output", "loss") and, when not the defaults, join its key and data
fingerprint, so a result computed with another output or loss is never reused.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from lossatlas import models, store, trust
from lossatlas.analysis.steps import select_steps
from lossatlas.batches import as_batches, fingerprint, to_device
from lossatlas.checks import check_choice
from lossatlas.distributed import Distributed
from lossatlas.errors import UserError
from lossatlas.finite import check_finite
from lossatlas.losses import (
    MODEL_LOSS,
    model_loss_batches,
    model_loss_precision,
    resolve_loss_and_output,
    resolve_loss_spec,
)
from lossatlas.outputs import LOSS_OUTPUT, OUTPUT, use_output
from lossatlas.probes.base import Probe, ProbeContext, Result
from lossatlas.probes.settings import DTYPES  # every dtype a checkpoint can be loaded in
from lossatlas.progress import task as progress_task
from lossatlas.store import default_results_path  # noqa: F401  (re-exported for analysis and viz)


def load_model(reader: "store.RunReader", step: int, *, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", trust_factory: bool = False,
               model_spec: dict | str | None = None, allow_nonfinite: bool = False) -> nn.Module:
    """Rebuild the run's model from its spec and load the checkpoint at ``step`` (strict, with a clear error).

    A checkpoint holding NaN/inf raises ``NonFiniteError`` naming the tensors, unless ``allow_nonfinite``.

    ``model_spec`` (the caller's own, so trusted) replaces the run's spec. A factory named by the
    run's spec is imported only when this user signed the file or ``trust_factory`` is set.
    """
    spec = model_spec if model_spec is not None else reader.model_spec
    if spec is None:
        raise UserError(f"{reader.path}: the run has no model spec; pass one with --model SPEC")
    model = models.build_model(spec, trust_factory=trust_factory)
    load_state(model, checkpoint_state(reader, step, allow_nonfinite=allow_nonfinite),
               source=f"{reader.path} step {step}")
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device)


def checkpoint_state(reader: "store.RunReader", step: int, *, allow_nonfinite: bool = False) -> dict[str, torch.Tensor]:
    """The state_dict stored at ``step``; ``NonFiniteError`` if it holds NaN/inf, unless ``allow_nonfinite``."""
    state = reader.checkpoint(step).state_dict()
    if not allow_nonfinite:
        check_finite(state, f"{reader.path}: checkpoint at step {step}")
    return state


def load_state(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` into ``model``; a key or shape mismatch raises UserError naming them."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: stored {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing[:5]) + (" …" if len(missing) > 5 else ""))
        if unexpected:
            parts.append("unexpected " + ", ".join(unexpected[:5]) + (" …" if len(unexpected) > 5 else ""))
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:5]))
        raise UserError(f"{source}: the model spec does not match the stored tensors ({'; '.join(parts)}); "
                        "pass the --model spec the checkpoint was trained with")
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(state[k].to(t.dtype) if t.dtype != state[k].dtype and t.is_floating_point() else state[k])


def load_batches(data_spec: dict | str | None, *, batch_size: int | None = 256, max_examples: int | None = None,
                 what: str = "run", trust_factory: bool = False, keep_labels: bool = False,
                 max_tokens: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Build the data set from its spec and split it into fixed batches (``load_data`` without the subset record)."""
    return load_data(data_spec, batch_size=batch_size, max_examples=max_examples, what=what,
                     trust_factory=trust_factory, keep_labels=keep_labels, max_tokens=max_tokens)[0]


def load_data(data_spec: dict | str | None, *, batch_size: int | None = 256, max_examples: int | None = None,
              what: str = "run", trust_factory: bool = False, keep_labels: bool = False,
              max_tokens: int | None = None) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict | None]:
    """The fixed batches of the data spec, and the record of the subset they hold (None for other data).

    A factory named by a spec read from a file (``reader.data_spec``) is imported only when this
    user signed the file or ``trust_factory`` is set. ``keep_labels``: dict batches keep their
    ``labels`` in the inputs (the loss "model"). For local data specs (``tokens``, ``hf_dataset``,
    ``image_folder``) ``max_examples``/``max_tokens`` pick the spec's seeded subset, recorded with the
    path, counts, seed and a hash of the chosen offsets; for any other data the first ``max_examples``.
    """
    if data_spec is None:
        raise UserError(f"the {what} has no data spec; pass --data '{{\"name\": \"digits\"}}' or another data spec")
    for name, value in (("max_examples", max_examples), ("max_tokens", max_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{name} must be a positive number, got {value!r}; leave it out to use every example")
    spec, limited = models.limit_data_spec(data_spec, max_examples=max_examples, max_tokens=max_tokens)
    data = models.build_data(spec, trust_factory=trust_factory)
    try:
        batches = as_batches(data, batch_size, limit=None if limited else max_examples, keep_labels=keep_labels)
    except ValueError as exc:
        raise UserError(f"data spec {data_spec}: {exc}") from None
    from lossatlas.models import local_data

    return batches, local_data.describe(data)


@dataclass
class RunOptions:
    """How to run a probe over a run: data, precision, cache policy, progress."""

    steps: str | Sequence[int] | None = "last"
    results_path: str | Path | None = None
    data: dict | str | None = None  # data spec override (default: the run's own)
    model: dict | str | None = None  # model spec override (default: the run's own)
    trust_factory: bool = False  # import a factory named by the run's specs even if this user did not sign them
    batch_size: int | None = 256
    max_examples: int | None = None
    max_tokens: int | None = None  # token data specs: a seeded subset of at most this many tokens
    dtype: str | None = None
    device: str = "cpu"
    force: bool = False
    progress: Callable[[str], None] | None = None  # called with a status line per step
    allow_nonfinite: bool = False  # compute on checkpoints holding NaN/inf instead of refusing them
    output: str | None = None  # the model output the probes use (None: "logits"; "loss" under loss "model")
    loss: str | None = None  # the loss to use instead of the run's own ("model": the model's own outputs.loss)
    fsdp: bool = False  # hessian probe only: FSDP2-sharded finite-difference products (lossatlas.curvature.sharded)


def choice_suffix(run_loss: str | None, loss: str, output: str) -> str:
    """What joins the key and data fingerprint: "" for the run's own loss and the output "logits"."""
    parts = []
    if loss != (run_loss or "cross_entropy"):
        parts.append(f"+loss:{loss}")
    if output != OUTPUT and not (loss == MODEL_LOSS and output == LOSS_OUTPUT):
        parts.append(f"+output:{output}")
    return "".join(parts)


def _keyed(key: str, suffix: str) -> str:
    """A probe's results-file key, changed (still 12 hex digits) when a non-default loss or output is used."""
    return key if not suffix else hashlib.sha256(f"{key}{suffix}".encode()).hexdigest()[:12]


@dataclass
class StepOutcome:
    """What ``run_probe`` did at one checkpoint, and the Result there."""

    step: int
    status: str  # "computed" | "cached" | "resumed" | "recomputed" ("cached": the probe and all its parts were)
    result: Result  # with its parts' Results merged in (Probe.merge)
    elapsed_s: float = 0.0
    statuses: dict[str, str] = field(default_factory=dict)  # the probe's and each part's own status, by name
    fresh: list[tuple[str, Result, float]] = field(default_factory=list, repr=False)  # (key, Result, s) to store


@dataclass
class RunReport:
    """Every checkpoint's outcome of one ``run_probe`` call, and where the results are stored."""

    probe: str
    key: str
    results_path: Path
    outcomes: list[StepOutcome] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # the results-file key of the probe and of each part

    @property
    def results(self) -> list[Result]:
        """The Result of every checkpoint, in step order."""
        return [o.result for o in self.outcomes]


def run_probe(run_path: str | Path, probe: Probe, options: RunOptions | None = None) -> RunReport:
    """Apply ``probe`` to the selected checkpoints of ``run_path`` and store each Result.

    A probe with parts (``Probe.parts``) stores its own Result and each part's under their own names and
    keys, and reuses each one that is stored: a changed part setting recomputes that part only. Each
    outcome holds the merged Result (``Probe.merge``) and every part's status.

    Under ``torchrun`` every rank runs this; rank 0 alone reads and writes the results file and
    tells the other ranks what it found. A probe that splits its own work (``splits_work``: grid
    points, data shards) runs every step on all ranks with ``ctx.dist``; any other probe gets the
    checkpoints dealt out across ranks, and rank 0 stores each round's results.
    """
    options = options or RunOptions()
    dtype = _dtype(options.dtype)
    dist = distributed_from_env()
    with store.RunReader(run_path) as reader:
        data_spec = options.data if options.data is not None else reader.data_spec
        for spec in (options.model if options.model is not None else reader.model_spec, data_spec):
            trust.require_trusted(spec, trust_factory=options.trust_factory)  # before any work or import
        steps = select_steps(options.steps, reader.steps())
        # a loss factory spec: the caller's --loss is trusted, the run file's own only when signed or --trust-factory
        run_loss = resolve_loss_spec(reader.loss, stored=True, signatures=getattr(reader, "spec_signatures", None),
                                     source=str(run_path), trust_factory=options.trust_factory)
        loss, output = resolve_loss_and_output(run_loss, resolve_loss_spec(options.loss), options.output,
                                               prefix=f"{run_path}: ")
        if not any(u.needs_data for u in (probe, *probe.parts())):  # a data-free probe: no data set is built
            if options.data is not None:  # but a --data given to it is still checked, not silently ignored
                try:
                    models.check_builder(options.data, "data")
                except ValueError as exc:
                    raise UserError(f"--data {options.data}: {exc}") from None
            batches, subset = [], None
        else:
            batches, subset = load_data(data_spec, batch_size=options.batch_size, max_examples=options.max_examples,
                                        max_tokens=options.max_tokens, trust_factory=options.trust_factory,
                                        keep_labels=loss == MODEL_LOSS)
        # a result is reused for the same data and the same model spec: an override's fingerprint joins the data's;
        # so do a loss other than the run's own and an output other than the logits
        suffix = choice_suffix(reader.loss, loss, output) + ("+fsdp" if options.fsdp else "")  # never mix with exact
        data_fp = fingerprint(batches) + model_override_fingerprint(reader, options, steps) + suffix
        batches = to_device(batches, options.device, dtype)
        units = (probe, *probe.parts())
        keys = [_keyed(u.config_hash(), suffix) for u in units]
        results_path = Path(options.results_path) if options.results_path else default_results_path(run_path)
        report = RunReport(probe=probe.name, key=keys[0], results_path=results_path,
                           keys={u.name: k for u, k in zip(units, keys)})
        results = store.ResultsStore(results_path, run_fingerprint=reader.fingerprint()) if dist.rank == 0 else None
        job = _StepJob(reader, results, probe, units, keys, batches, data_fp, loss, dtype, options, dist, output, subset)
        try:
            found = dist.broadcast({s: job.lookup(s) for s in steps} if results is not None else None)
            pending = [s for s in steps if not all(_is_cached(f, data_fp) for f in found[s])]
            cached = {s: job.cached(s, found[s]) for s in steps if s not in pending}
            computed: dict[int, StepOutcome] = {}
            if not dist.active or probe.splits_work:
                for s in pending:
                    computed[s] = job.compute(s, found[s], dist)
                    job.store(computed[s])
                    dist.barrier()
            else:  # deal the checkpoints out: round r gives rank i the step pending[r·W + i]
                for r in range(0, len(pending), dist.world_size):
                    mine = pending[r + dist.rank] if r + dist.rank < len(pending) else None
                    outcome = job.compute(mine, found[mine], Distributed()) if mine is not None else None
                    gathered = dist.gather(outcome)
                    for o in gathered or [outcome]:
                        if o is not None:
                            computed[o.step] = o
                            job.store(o)
                    dist.barrier()
            report.outcomes = [cached.get(s) or computed[s] for s in steps if s in cached or s in computed]
        finally:
            if results is not None:
                results.close()
    return report


def model_override_fingerprint(reader: "store.RunReader", options: RunOptions, steps: Sequence[int]) -> str:
    """Check the model spec before the results file is consulted; ``"+model:<fingerprint>"`` of an override.

    A missing or malformed spec is refused; an override (``options.model``) other than the run's own spec must
    also build and load the first selected checkpoint, so a bad one is refused even when results are stored.
    Returns "" for the run's own spec.
    """
    spec = options.model if options.model is not None else reader.model_spec
    if spec is None:
        raise UserError(f"{reader.path}: the run has no model spec; pass one with --model SPEC")
    canon = models.normalize_spec(spec)
    if options.model is None:
        return ""
    try:
        if reader.model_spec is not None and models.normalize_spec(reader.model_spec) == canon:
            return ""
    except UserError:  # the run's own spec is malformed: the override replaces it
        pass
    if steps:
        model = models.build_model(canon, trust_factory=options.trust_factory)
        load_state(model, checkpoint_state(reader, steps[0], allow_nonfinite=True),
                   source=f"{reader.path} step {steps[0]}")
    return f"+model:{models.spec_fingerprint(canon)}"


def _is_cached(found, data_fp: str) -> bool:
    return found is not None and found[1].get("data_fingerprint") == data_fp and found[1].get("status") == "complete"


@dataclass
class _StepJob:
    """What every step of one ``run_probe`` call shares: the run, the store, the probe and the data.

    ``units`` are the probe and its parts (the probe first), ``keys`` their results-file keys.
    """

    reader: Any
    results: Any
    probe: Probe
    units: tuple[Probe, ...]
    keys: list[str]
    batches: list
    data_fp: str
    loss: str
    dtype: Any
    options: RunOptions
    dist: Distributed
    output: str = OUTPUT  # the model output every probe uses ("loss" under the loss "model")
    subset: dict | None = None  # the record of a local data spec's seeded subset (path, counts, seed, offsets hash)

    def lookup(self, step: int) -> list:
        """What the store holds for each unit at ``step`` (None for each under ``force``)."""
        if self.options.force:
            return [None] * len(self.units)
        return [self.results.read(u.name, key, step) for u, key in zip(self.units, self.keys)]

    def cached(self, step: int, found: list) -> StepOutcome:
        for u in self.units:
            _say(self.options, f"{u.name} step {step}: cached")
        merged = self.probe.merge(found[0][0], [f[0] for f in found[1:]])
        return StepOutcome(step, "cached", merged, statuses={u.name: "cached" for u in self.units})

    def compute(self, step: int, found: list, dist: Distributed) -> StepOutcome:
        """Compute every unit not stored complete for this data at ``step``; the others come from the store."""
        todo = [i for i, f in enumerate(found) if not _is_cached(f, self.data_fp)]
        reader, options = self.reader, self.options
        model = load_model(reader, step, dtype=self.dtype, device=options.device,
                           trust_factory=options.trust_factory, model_spec=options.model,
                           allow_nonfinite=options.allow_nonfinite)
        use_output(model, self.output)  # every model_outputs call of every probe takes this output
        batches = model_loss_batches(model, self.batches) if self.loss == MODEL_LOSS else self.batches
        precision = model_loss_precision(model, batches) if self.loss == MODEL_LOSS else None
        if precision is not None:
            warnings.warn(precision, stacklevel=2)
        attrs = reader.checkpoint_attrs(step)
        optimizer_state = None
        if any(self.units[i].needs_optimizer_state for i in todo):
            optimizer_state = reader.checkpoint(step, optimizer_state=True).optimizer_state
        base = ProbeContext(
            model=model, data=batches, loss=self.loss, step=step,
            lr=_finite_or_none(attrs.get("lr")), optimizer_state=optimizer_state, optimizer=reader.optimizer,
            device=torch.device(options.device), dtype=self.dtype, steps=tuple(reader.steps()), dist=dist,
            state_at=lambda s: checkpoint_state(reader, s, allow_nonfinite=options.allow_nonfinite),
            model_of_run=lambda path, s: _model_of_run(path, s, dtype=self.dtype, device=options.device),
        )
        results = [f[0] if f is not None else None for f in found]
        statuses = {u.name: "cached" for u in self.units}
        for i, u in enumerate(self.units):
            if i not in todo:
                _say(options, f"{u.name} step {step}: cached")
        fresh: list[tuple[str, Result, float]] = []
        start = time.perf_counter()
        for i in todo:
            unit, key = self.units[i], self.keys[i]
            partial, status = None, "computed"
            if found[i] is not None:
                stored, info = found[i]
                if info.get("data_fingerprint") == self.data_fp and info.get("status") == "partial":
                    partial, status = stored, "resumed"
                else:
                    status = "recomputed"
            ctx = dataclasses.replace(base, partial=partial, save_partial=self._partial_saver(key))
            _say(options, f"{unit.name} step {step}: {status}")
            t0 = time.perf_counter()
            with progress_task(f"{unit.name} step {step}"):  # names the estimators' progress lines
                if options.fsdp:  # every rank shards the model; sharded finite-difference products, rank 0 stores
                    from lossatlas.curvature.sharded import run_sharded_hessian

                    results[i] = run_sharded_hessian(unit, ctx)
                else:
                    results[i] = unit.run_own(ctx)
            results[i].meta.update(loss=self.loss, output=self.output)  # how it was computed, in every result
            if self.subset is not None:
                results[i].meta["data_subset"] = self.subset
            for limit in ("max_examples", "max_tokens"):  # the data size asked for: shown in the result's label
                if getattr(options, limit) is not None:
                    results[i].meta[limit] = getattr(options, limit)
            if precision is not None:
                results[i].meta["loss_precision_warning"] = precision
            fresh.append((key, results[i], time.perf_counter() - t0))
            statuses[unit.name] = status
        own = statuses[self.probe.name]
        overall = own if own != "cached" else next(s for s in statuses.values() if s != "cached")
        merged = self.probe.merge(results[0], results[1:])
        return StepOutcome(step, overall, merged, time.perf_counter() - start, statuses, fresh)

    def _partial_saver(self, key: str):
        def save_partial(res: Result) -> None:
            if self.results is not None and not self.dist.active:  # under torchrun no rank holds the whole picture
                self.results.write(res, key=key, status="partial", data_fingerprint=self.data_fp)

        return save_partial

    def store(self, outcome: StepOutcome) -> None:
        """Write every Result computed for ``outcome`` under its own key (all of a step's, after all are done)."""
        if self.results is not None:
            for key, result, elapsed in outcome.fresh:
                self.results.write(result, key=key, status="complete", data_fingerprint=self.data_fp,
                                   elapsed_s=elapsed)


def _model_of_run(path: str | Path, step: int, *, dtype: torch.dtype | None, device: str) -> nn.Module:
    """The model of another run file at ``step`` (ValueError naming the steps it has when it lacks that one)."""
    with store.RunReader(path) as reader:
        if step not in reader.steps():
            raise ValueError(f"run {path} has no checkpoint at step {step}; pick one of "
                             f"{', '.join(map(str, reader.steps()[:10]))}")
        return load_model(reader, int(step), dtype=dtype, device=device)


def distributed_from_env() -> Distributed:
    """Join the torchrun job this process belongs to (gloo on CPU, NCCL on GPU), or run alone."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if torch.cuda.is_available() and os.environ.get("LOSSATLAS_BACKEND") != "gloo" else "gloo")
        atexit.register(_leave_process_group)
    return Distributed(rank=tdist.get_rank(), world_size=tdist.get_world_size())


def _leave_process_group() -> None:
    """Tear the process group down before the interpreter exits: gloo's threads otherwise race the exit (abort)."""
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    return DTYPES[check_choice("dtype", name, DTYPES, error=UserError)]


def _say(options: RunOptions, line: str) -> None:
    if options.progress is not None:
        options.progress(line)
