"""Loss and accuracy at points of a grid in parameter space: the engine the landscape probes share.

A point with coordinates c = (c_1, ..., c_K) along directions d_1, ..., d_K is θ(c) = θ* + Σ_k c_k d_k
(one direction: a line, θ(α) = θ* + α d; two: a plane, θ(α, β) = θ* + α d_x + β d_y). At every point,
on a fixed data set of batches b with n_b examples (N in all):

- loss L(θ) = Σ_b n_b·mean_b(θ) / N, the example-weighted mean of the per-batch mean losses;
- accuracy = (number of correct predictions) / N, in [0, 1];
- extra metrics f(outputs, targets) (a batch mean) are averaged like the loss.

Points are evaluated with ``torch.func.functional_call`` on fresh tensor dicts (the user's module is never
mutated), several points per forward pass through ``torch.func.vmap`` over stacked dicts. With
``bn="recompute"`` the BatchNorm running statistics are recomputed at every point as the plain average
of per-batch statistics over the ``bn_data`` batches.

First-layer trick (``first_layer=True``, the default): the first layer's output is affine in its own
parameters, f₁(x; W + Σ_k c_k D_k, b + Σ_k c_k e_k) = f₁(x; W, b) + Σ_k c_k f₁(x; D_k, e_k) for a linear,
convolution or embedding layer. When such a layer reads the model's input tensor itself, its K + 1 outputs
are computed once per batch and every point's output is their combination (terms added in the order of the
directions, so a point's bits do not depend on its chunk); the layer's own forward is skipped at every point.

Grid indexing: Z has shape (ny, nx) and ``Z[i, j] = L(x_j, y_i)`` (``indexing='xy'``, as
``np.meshgrid(x, y)``); flat point k ↔ (x[k mod nx], y[k div nx]).

Point sessions (one point per forward, the default on CPU): the point's moving tensors live in one preallocated
flat buffer that the module reads for the whole grid (its parameters are swapped for views of the buffer once,
as ``functional_call`` does per call, and restored afterwards), eval mode is set once, and every point writes
θ* + c_1 d_1 + c_2 d_2 into the buffer in place with the same roundings as ``linear_combination``
((θ* + fl(c_1 d_1)) + fl(c_2 d_2)); fl(c_k d_k) is kept while c_k does not change (a grid row shares its β),
and the grid columns' θ* + fl(c_1 d_1) are kept (``COLUMN_BYTES``), so a point costs one pass over P entries.
Loss values and correct counts stay tensors until the chunk ends (no host sync per point on an accelerator).

Bitwise reproducibility: a vmapped forward over a chunk of C points differs in the last bits from the same
points in another chunk (batched matmuls). So the grid is cut into a fixed partition of chunks
(consecutive positions in the list of points to evaluate, ``chunk_size`` each) that does not depend on which
points are already done: a resumed run recomputes whole chunks and gets the uninterrupted run's bits.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap

from lossatlas import losses as L
from lossatlas.outputs import model_outputs
from lossatlas.probes.directions import Direction, model_state
from lossatlas.probes.modes import evaluation_mode
from lossatlas.probes.paramdicts import linear_combination
from lossatlas.probes.settings import check_choice
from lossatlas.progress import report

try:  # what functional_call runs per call; a session runs it once for the whole grid
    from torch.nn.utils.stateless import _reparametrize_module
except ImportError:  # pragma: no cover - another PyTorch: sessions off, functional_call per point
    _reparametrize_module = None

BN_MODES: tuple[str, ...] = ("keep", "recompute")
# Layers whose output is affine in their own parameters (the first-layer trick); Embedding only without max_norm.
AFFINE_LAYERS: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
FIRST_LAYER_BYTES = 2**30  # the most bytes of cached first-layer outputs ((K + 1) per batch) the trick may hold
SESSION_BYTES = 2**30  # the most bytes of a point session's flat copies (θ*, the K directions, K scaled terms, the point)
COLUMN_BYTES = 2**28  # the most bytes of a session's kept grid columns θ* + fl(c_1 d_1) (at most 256 of them)
Metric = Callable[[Tensor, Tensor], Tensor]  # (outputs, targets) -> the batch mean of a per-example metric


def _topk_accuracy(k: int) -> Metric:
    """The batch's top-k accuracy: the fraction of examples whose label is among the k largest outputs."""
    def metric(out: Tensor, y: Tensor) -> Tensor:
        out = out.reshape(-1, out.shape[-1])
        top = out.topk(min(k, out.shape[-1]), dim=-1).indices
        return (top == y.reshape(-1, 1).long()).any(dim=-1).to(out.dtype).mean()
    return metric


# Metrics by name (the CLI's --metrics): every loss of the model's outputs (its batch mean) and top-5 accuracy;
# ``register_metric`` adds a user's. Each is f(outputs, targets) -> the batch mean, weighted like the loss.
METRICS: dict[str, Metric] = {
    **{n: (lambda o, y, _n=n: L.batch_loss(_n, o, y)) for n in L.OUTPUT_LOSSES},
    "top5_accuracy": _topk_accuracy(5),
}


def register_metric(name: str, fn: Metric) -> Metric:
    """Register ``fn(outputs, targets) -> batch mean`` under ``name`` for ``--metrics`` (returns ``fn``)."""
    if name in ("loss", "accuracy"):
        raise ValueError(f"metric name {name!r} clashes with a built-in one; pick another name")
    METRICS[name] = fn
    return fn


def metrics_by_name(names: Sequence[str]) -> dict[str, Metric]:
    """The registered metrics ``names`` (``METRICS``); ValueError naming the choices for an unknown one."""
    return {n: METRICS[check_choice("loss or metric", n, METRICS)] for n in names}


def _bn_stat_names(model: nn.Module) -> list[str]:
    """Names of the running statistics of every BatchNorm layer that tracks them."""
    names = []
    for mod_name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            p = f"{mod_name}." if mod_name else ""
            names += [p + "running_mean", p + "running_var", p + "num_batches_tracked"]
    return names


def recompute_bn_stats(
    model: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], batches: Sequence[tuple[Tensor, Tensor]]
) -> dict[str, Tensor]:
    """BatchNorm running statistics recomputed at ``params``: fresh buffers after a train-mode pass.

    Reset (mean 0, var 1, count 0), then forward ``batches`` in train mode with momentum=None, i.e. the
    running statistics become the plain average of the per-batch statistics (PyTorch's cumulative
    moving average). Works on copies of ``buffers``; the model's own buffers and flags are untouched.
    Inputs may be tensors or dicts (``model(**x)``, by ``model_outputs``).
    """
    fresh = {k: v.clone() for k, v in buffers.items()}
    for name in _bn_stat_names(model):
        if name in fresh:
            t = fresh[name]
            t.fill_(1 if name.endswith("running_var") else 0)
    with torch.no_grad(), evaluation_mode(model, "train", cumulative_bn=True):
        for x, _ in batches:
            model_outputs(model, x, params=(dict(params), fresh))  # updates `fresh` in place
    return fresh


class MetricSettings:
    """The metric settings of a landscape probe, mixed into surface, interpolate and trajectory.

    ``metrics``: registered names (a CLI option); ``metric_fns``: Python callables ``fn(outputs, targets)``,
    stored in ``config()`` by their names.
    """

    metrics: tuple[str, ...]
    metric_fns: Mapping[str, Metric] | None

    def config(self) -> dict:
        """The settings as JSON; ``metric_fns`` (Python callables) by their names."""
        out = super().config()  # type: ignore[misc]
        out["metric_fns"] = sorted(self.metric_fns) if self.metric_fns else None
        return out

    def _metrics(self) -> dict[str, Metric]:
        """The registered ``metrics`` and the callables ``metric_fns``, by name."""
        return {**metrics_by_name(self.metrics), **dict(self.metric_fns or {})}


class PointEvaluator:
    """Loss, accuracy and extra metrics at points θ* + Σ_k c_k d_k, on a fixed data set.

    Args:
        model: the module (its structure; its parameters are never read for the point values
            except where ``base`` lacks a tensor).
        base: θ*, tensors by name (parameters, and buffers when the directions perturb buffers).
        directions: the directions d_k (Direction or dict of tensors).
        data: (inputs, targets) batches; loss = Σ_b n_b·mean_b / N, accuracy = correct / N.
        loss: a name from ``lossatlas.losses``.
        metrics: extra per-batch-mean metrics ``f(outputs, targets) -> Tensor``, averaged like the loss.
        bn: "keep" (evaluate with θ*'s running statistics, eval mode) or "recompute" (recompute BN
            statistics at every point from ``bn_data``, then eval mode).
        bn_data: the batches for "recompute" (default: ``data``).
        vectorize: evaluate a chunk of points in one vmapped forward (else one forward per point).
        first_layer: use the first-layer trick (module docstring) where the model allows it;
            ``first_layer_name`` then names the layer.
    """

    def __init__(
        self,
        model: nn.Module,
        base: Mapping[str, Tensor],
        directions: Sequence[Direction | Mapping[str, Tensor]],
        data: Sequence[tuple[Tensor, Tensor]],
        loss: str,
        *,
        metrics: Mapping[str, Metric] | None = None,
        bn: str = "keep",
        bn_data: Sequence[tuple[Tensor, Tensor]] | None = None,
        vectorize: bool = True,
        first_layer: bool = True,
    ) -> None:
        L.check_loss_name(loss)
        check_choice("bn", bn, BN_MODES)
        if not data:
            raise ValueError("the data holds no batches; give at least one (inputs, targets) batch")
        self.model, self.data, self.loss, self.bn = model, list(data), loss, bn
        self.bn_data = list(bn_data) if bn_data is not None else self.data
        self.metrics = dict(metrics or {})
        clash = set(self.metrics) & {"loss", "accuracy"}
        if clash:
            raise ValueError(f"extra metric names {sorted(clash)} clash with the built-in ones; rename them")
        self.vectorize = vectorize
        state = model_state(model, "states")
        unknown = [k for k in base if k not in state]
        if unknown:
            raise ValueError(f"base tensors {unknown[:3]} are not parameters or buffers of the model")
        state.update({k: v.detach() for k, v in base.items()})
        self.dirs = [d.tensors if isinstance(d, Direction) else dict(d) for d in directions]
        for d in self.dirs:
            bad = [k for k in d if k not in state]
            if bad:
                raise ValueError(f"direction tensors {bad[:3]} are not parameters or buffers of the model")
        self.param_names = {k for k, _ in model.named_parameters()}
        # tensors that move with the point: floating tensors that some direction touches
        self.moving = [k for k in state if state[k].is_floating_point() and any(k in d for d in self.dirs)]
        if bn == "recompute":
            self.moving += [k for k in _bn_stat_names(model) if k in state and k not in self.moving]
        self.fixed = {k: v for k, v in state.items() if k not in self.moving}
        self.state = state
        self.num_examples = sum(L.batch_count(loss, y) for _, y in self.data)
        self.weights = L.batch_weights(loss, self.data)  # n_b / N
        self.vectorized_ok = vectorize
        # the first-layer trick: None = not yet tried, False = off or not applicable, else the cached outputs
        self._first: _FirstLayer | bool | None = None if first_layer and self.dirs else False
        if L.is_closure(loss):  # a closure runs its own forward: one point at a time, every layer computed
            self.vectorized_ok, self._first = False, False
        self._live: _Session | None = None  # the open point session (``session``), if any

    def _session_ok(self) -> bool:
        """Whether points can be evaluated in a session (``session``).

        Needs bn "keep", an output loss, moving tensors of one dtype and device that every direction matches (so
        in-place sums round as the out-of-place ones), (2K + 2)·P entries within ``SESSION_BYTES``, and PyTorch's
        module reparametrization (what ``functional_call`` runs) importable.
        """
        if self.bn != "keep" or L.is_closure(self.loss) or not self.moving or _reparametrize_module is None:
            return False
        t0 = self.state[self.moving[0]]
        for k in self.moving:
            t = self.state[k]
            if t.dtype != t0.dtype or t.device != t0.device:
                return False
            for d in self.dirs:
                if k in d and (d[k].dtype != t.dtype or d[k].device != t.device or d[k].shape != t.shape):
                    return False
        numel = sum(self.state[k].numel() for k in self.moving)
        return (2 * len(self.dirs) + 2) * numel * t0.element_size() <= SESSION_BYTES

    @contextlib.contextmanager
    def session(self) -> Iterator[PointEvaluator]:
        """A block in which ``evaluate`` runs point by point on preallocated buffers (module docstring).

        Sets eval mode and swaps the module's tensors for the point buffer's views once for the block (restored
        on exit, as ``functional_call`` restores them); a no-op where ``_session_ok`` is False or one is open.
        """
        if self._live is not None or not self._session_ok():
            yield self
            return
        if self._first is None:
            self._first = _FirstLayer.find(self) or False
        live = _Session(self)
        first = self._first if isinstance(self._first, _FirstLayer) else None
        if first is not None:  # its buffers now, before any forward: long-lived blocks amid a forward's fragment the heap
            for b in range(len(self.data)):
                live.first_buffers(b, first)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(evaluation_mode(self.model, "eval"))
            stack.enter_context(_reparametrize_module(self.model, {**self.fixed, **live.views}, tie_weights=True,
                                                      strict=False))
            if first is not None:
                stack.enter_context(first.serving_from(live.z))
            self._live = live
            try:
                yield self
            finally:
                self._live = None

    def _evaluate_live(self, coords: np.ndarray) -> dict[str, np.ndarray]:
        """``evaluate`` in an open session: one forward per point and batch, values read back once at the end."""
        live = self._live
        assert live is not None
        first = self._first if isinstance(self._first, _FirstLayer) else None
        scored = L.accuracy_available(self.loss)
        losses: list[Tensor] = []
        correct: list[Tensor | int] = []
        extra = {n: np.zeros(len(coords)) for n in self.metrics}
        for i, c in enumerate(coords):
            live.fill(c)
            for b, ((x, y), w) in enumerate(zip(self.data, self.weights)):
                if first is not None:
                    live.z[0] = first.output_into(b, c, live.first_buffers(b, first))
                out = model_outputs(self.model, x)
                live.z[0] = None  # other calls of the model within the session compute the layer
                losses.append(L.batch_loss(self.loss, out, y))
                if scored:
                    if b not in live.labels:  # the labels' gather index and mask, once per batch
                        live.labels[b] = _labels(out, y)
                    correct.append(_correct_count(out, y, self.loss, live.labels[b]))
                for name, fn in self.metrics.items():
                    extra[name][i] += w * float(fn(out, y))
        n_b = len(self.data)
        vals = torch.stack(losses).tolist()  # one read-back: the same float values float() gives one by one
        hits = [int(v) for v in torch.stack([torch.as_tensor(v) for v in correct]).tolist()] if scored else []
        sums = {n: np.zeros(len(coords)) for n in self.names}
        for i in range(len(coords)):
            for b, w in enumerate(self.weights):  # batches in order, as the per-point loop adds them
                sums["loss"][i] += w * vals[i * n_b + b]
                if scored:
                    sums["accuracy"][i] += hits[i * n_b + b]
        if not scored:
            sums["accuracy"][:] = np.nan
        sums.update(extra)
        sums["accuracy"] /= self.num_examples
        return sums

    @property
    def names(self) -> list[str]:
        """The metric names ``evaluate`` returns: loss, accuracy, then the extra metrics in order."""
        return ["loss", "accuracy", *self.metrics]

    def point_state(self, coord: Sequence[float]) -> dict[str, Tensor]:
        """The moving tensors at one point: θ* + Σ_k c_k d_k, computed the same way for every point."""
        out = linear_combination(self.state, coord, self.dirs, self.moving)
        if self.bn == "recompute":
            params = {k: v for k, v in {**self.fixed, **out}.items() if k in self.param_names}
            buffers = {k: v for k, v in {**self.fixed, **out}.items() if k not in self.param_names}
            fresh = recompute_bn_stats(self.model, params, buffers, self.bn_data)
            out.update({k: fresh[k] for k in self.moving if k in fresh})
        return out

    def evaluate(self, coords: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric at each row of ``coords`` (shape (C, K)); arrays of shape (C,).

        One point, or no vmap: point by point in a session (``session``; the open one, else one for this call);
        else C points per vmapped forward. A session gives the bits of ``linear_combination`` + ``functional_call``
        per point.
        """
        coords = np.atleast_2d(np.asarray(coords, dtype=np.float64))
        if coords.shape[1] != len(self.dirs):
            raise ValueError(f"points need {len(self.dirs)} coordinates (one per direction), got {coords.shape[1]}")
        if self._live is not None or ((len(coords) == 1 or not self.vectorized_ok) and self._session_ok()):
            with self.session():
                return self._evaluate_live(coords)
        with torch.no_grad():
            states = [self.point_state(c) for c in coords]
            sums = {n: np.zeros(len(states)) for n in self.names}
            scored = L.accuracy_available(self.loss)
            if not scored:
                sums["accuracy"][:] = np.nan
            if L.is_closure(self.loss):
                return self._evaluate_closure(states, sums)
            with evaluation_mode(self.model, "eval"):
                for b, ((x, y), w) in enumerate(zip(self.data, self.weights)):
                    outs = self._forward(states, x, coords, b)  # (C, B, ...): every point of the chunk on this batch
                    for i, out in enumerate(outs):
                        sums["loss"][i] += w * float(L.batch_loss(self.loss, out, y))
                        if scored:  # the loss "model" gives the loss, not predictions: accuracy is NaN
                            sums["accuracy"][i] += L.correct_count(out, y, self.loss)
                        for name, fn in self.metrics.items():
                            sums[name][i] += w * float(fn(out, y))
        sums["accuracy"] /= self.num_examples
        return sums

    def _evaluate_closure(self, states: list[dict[str, Tensor]], sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A closure loss at each point: Σ_b n_b L_b / Σ_b n_b (n_b its count or the batch size); metrics on outputs."""
        counts = np.zeros(len(states))
        with evaluation_mode(self.model, "eval"):
            for x, y in self.data:
                for i, s in enumerate(states):
                    with torch.enable_grad():  # a closure may differentiate through its inputs (PINN residuals)
                        value, n = L.closure_value(self.loss, self.model, {**self.fixed, **s}, (x, y))
                    sums["loss"][i] += n * float(value.detach())
                    counts[i] += n
                    if self.metrics:  # the metrics score the model's outputs: one more forward
                        out = model_outputs(self.model, x, params=({**self.fixed, **s},))
                        for name, fn in self.metrics.items():
                            sums[name][i] += n * float(fn(out, y))
        for name in ["loss", *self.metrics]:
            sums[name] /= np.where(counts > 0, counts, np.nan)
        return sums

    @property
    def first_layer_name(self) -> str | None:
        """The layer the first-layer trick serves from cached outputs (None: the trick is off or not applicable)."""
        return self._first.name if isinstance(self._first, _FirstLayer) else None

    def _forward(self, states: list[dict[str, Tensor]], x: Tensor, coords: np.ndarray | None = None,
                 batch: int = 0) -> list[Tensor]:
        if self._first is None:
            self._first = _FirstLayer.find(self) or False
        first = self._first if isinstance(self._first, _FirstLayer) and coords is not None else None

        def f(moving: dict[str, Tensor], inputs: Tensor, z: Tensor | None = None) -> Tensor:
            if z is None:
                return model_outputs(self.model, inputs, params=({**self.fixed, **moving},))
            with first.serving(z):  # the first layer returns z instead of computing it
                return model_outputs(self.model, inputs, params=({**self.fixed, **moving},))

        zs = [first.output(batch, c) for c in coords] if first is not None else [None] * len(states)
        if self.vectorized_ok and len(states) > 1:
            stacked = {k: torch.stack([s[k] for s in states]) for k in self.moving}
            try:
                if first is None:
                    return list(vmap(f, in_dims=(0, None))(stacked, x))
                return list(vmap(f, in_dims=(0, None, 0))(stacked, x, torch.stack(zs)))
            except (RuntimeError, NotImplementedError):  # an op without a batching rule: loop instead
                self.vectorized_ok = False
        return [f(s, x, z) for s, z in zip(states, zs)]


def _labels(out: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """(labels (N,), gather index (N, 1), valid (N, 1)) for class labels of (N, V) or (B, T, V) outputs, else None.

    ``valid`` marks labels in [0, V): any other label (an ignore index) is never an argmax.
    """
    if out.ndim == 3 and y.ndim == 2:  # (B, T, V) logits with (B, T) labels, as losses.correct_count flattens them
        y = y.reshape(-1)
    elif out.ndim != 2:
        return None
    if y.ndim != 1 or y.is_floating_point() or y.shape[0] * out.shape[-1] != out.numel():
        return None
    labels, n = y.long(), out.shape[-1]
    return labels, labels.clamp(0, n - 1).unsqueeze(1), ((labels >= 0) & (labels < n)).unsqueeze(1)


def _correct_count(out: Tensor, y: Tensor, loss: str, labels: tuple[Tensor, Tensor, Tensor] | None = None,
                   ) -> Tensor | int:
    """``losses.correct_count`` (argmax predictions equal to the label), as a 0-d tensor where it can stay one.

    Class labels on the CPU: a row can only be correct where its label's output is not below the row's maximum
    (equal to it, or the row has a NaN, which argmax picks), so argmax runs on those rows only; ``amax`` is many
    times faster than ``argmax`` on the CPU and the count is the same integer (ties and NaNs are left to argmax).
    ``labels``: ``_labels(out, y)``, when the caller keeps it for a batch.
    """
    if loss == "causal_lm":
        return L.correct_count(out, y, loss)
    labels = labels if labels is not None else _labels(out, y)
    if labels is None:
        return L.correct_count(out, y, loss)
    lab, index, valid = labels
    out = out.reshape(-1, out.shape[-1])
    if out.device.type != "cpu":
        return (out.argmax(dim=-1) == lab).sum()
    # not (label's output < max): equal to the max, or a NaN max (x < NaN is False)
    cand = torch.lt(out.gather(1, index), out.amax(dim=-1, keepdim=True)).logical_not_().logical_and_(valid)
    rows = cand.view(-1).nonzero().view(-1)
    return (out[rows].argmax(dim=-1) == lab[rows]).sum()


class _Session:
    """A point session's buffers: the flat θ*, directions d_k, scaled terms fl(c_k d_k) and point θ(c).

    ``views`` are the point's tensors by name (views of the flat point buffer) that the module reads; ``fill``
    writes θ* + Σ_k c_k d_k into them with ``linear_combination``'s roundings: (θ* + fl(c_1 d_1)) + fl(c_2 d_2),
    over the entries each direction has (a direction lacking a tensor adds nothing there). With two or more
    directions, the partial sums θ* + fl(c_1 d_1) of the grid's columns are kept (as many as ``COLUMN_BYTES``
    holds, at most 256), so that a point in a later row costs one pass: θ(c) = column(c_1) + fl(c_2 d_2).
    """

    def __init__(self, ev: PointEvaluator) -> None:
        names, n_dirs = ev.moving, len(ev.dirs)
        sizes = [ev.state[k].numel() for k in names]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        t0 = ev.state[names[0]]
        # one block for θ*, the point, the K directions and K scaled terms: one allocation, outside the heap that
        # the forward passes allocate from (many separate P-sized blocks there slow the first forwards down)
        block = torch.empty((2 * n_dirs + 2, int(starts[-1])), dtype=t0.dtype, device=t0.device)
        self.base, self.point = block[0], block[1]
        torch.cat([ev.state[k].reshape(-1) for k in names], out=self.base)
        self.views = {k: self.point[starts[i] : starts[i + 1]].view(ev.state[k].shape) for i, k in enumerate(names)}
        self.dirs: list[Tensor] = []
        self.segments: list[list[tuple[int, int]]] = []  # per direction: the flat ranges of the tensors it has
        for j, d in enumerate(ev.dirs):
            self.dirs.append(block[2 + j])
            torch.cat([(d[k] if k in d else torch.zeros_like(ev.state[k])).reshape(-1) for k in names],
                      out=self.dirs[j])
            segs: list[tuple[int, int]] = []
            for i, k in enumerate(names):
                if k not in d:
                    continue
                if segs and segs[-1][1] == starts[i]:  # contiguous with the previous one: merge
                    segs[-1] = (segs[-1][0], int(starts[i + 1]))
                else:
                    segs.append((int(starts[i]), int(starts[i + 1])))
            self.segments.append(segs)
        self.scaled = [block[2 + n_dirs + j] for j in range(n_dirs)]
        self.scaled_at: list[str | None] = [None] * len(ev.dirs)  # the bits (float.hex) of c_k in ``scaled[k]``
        self.z: list[Tensor | None] = [None]  # the first layer's output at the current point and batch
        nbytes = self.base.numel() * self.base.element_size()
        full = [(0, self.base.numel())]
        room = COLUMN_BYTES // max(nbytes, 1)
        # columns θ* + fl(c_1 d_1), keyed by c_1's bits: only when d_1 spans every moving tensor and a d_2 follows
        self.max_columns = int(min(max(room, 0), 256)) if len(ev.dirs) >= 2 and self.segments[0] == full else 0
        self.columns: dict[str, Tensor] = {}
        self._column_block: Tensor | None = None  # the columns' rows, one allocation (untouched rows cost no memory)
        self._first: dict[int, tuple[Tensor, Tensor]] = {}
        self.labels: dict[int, tuple[Tensor, Tensor, Tensor] | None] = {}  # ``_labels`` of each batch

    def _scaled(self, k: int, c: float) -> Tensor:
        """fl(c·d_k), as ``float(c) * d[k]``; recomputed only when c's bits change (-0.0 and 0.0 differ)."""
        key = float(c).hex()
        if self.scaled_at[k] != key:
            torch.mul(self.dirs[k], float(c), out=self.scaled[k])
            self.scaled_at[k] = key
        return self.scaled[k]

    def _column(self, c: float) -> Tensor | None:
        """θ* + fl(c·d_1), kept by c's bits while there is room (None when there is none)."""
        key = float(c).hex()
        col = self.columns.get(key)
        if col is None and len(self.columns) < self.max_columns:
            if self._column_block is None:
                self._column_block = self.base.new_empty((self.max_columns, self.base.numel()))
            col = self._column_block[len(self.columns)]
            torch.add(self.base, self._scaled(0, c), out=col)
            self.columns[key] = col
        return col

    def fill(self, coord: Sequence[float]) -> None:
        """Write θ* + Σ_k c_k d_k into the point buffer, the terms added in the order of the directions."""
        full = [(0, self.base.numel())]
        src, in_point = self.base, False  # the partial sum so far, and whether it is in the point buffer yet
        for k, c in enumerate(coord):
            segs = self.segments[k]
            if not segs:
                continue
            if k == 0 and self.max_columns:
                col = self._column(c)
                if col is not None:  # θ* + fl(c_1 d_1) kept from an earlier row
                    src = col
                    continue
            scaled = self._scaled(k, c)
            if not in_point and segs == full:
                torch.add(src, scaled, out=self.point)  # the partial sum + fl(c_k d_k), one pass
            else:
                if not in_point:
                    self.point.copy_(src)
                for a, b in segs:
                    self.point[a:b].add_(scaled[a:b])
            in_point = True
        if not in_point:
            self.point.copy_(src)

    def first_buffers(self, batch: int, first: _FirstLayer) -> tuple[Tensor, Tensor]:
        """(output, scratch) buffers of the first layer's cached output for ``batch``, allocated once."""
        if batch not in self._first:
            y0 = first.outputs[batch][0]
            self._first[batch] = (torch.empty_like(y0), torch.empty_like(y0))
        return self._first[batch]


class _FirstLayer:
    """The first-layer trick: a layer affine in its parameters that reads the model's input, served from cache.

    ``outputs[b]`` holds, for batch b, the layer's output at θ* and its linear part along every direction,
    f₁(x_b; D_k, e_k) (a zero-filled bias where the direction has none; None where the direction does not touch
    the layer); a point's output is f₁(x_b; θ*) + Σ_k c_k f₁(x_b; D_k, e_k), exact by linearity.
    """

    def __init__(self, name: str, module: nn.Module, outputs: list[list[Tensor | None]]) -> None:
        self.name, self.module, self.outputs = name, module, outputs

    @contextlib.contextmanager
    def serving(self, z: Tensor) -> Iterator[None]:
        """Within the block, calling the layer returns ``z`` (its forward is not run)."""
        self.module.forward = lambda *args, **kwargs: z  # an instance attribute shadows the class's forward
        try:
            yield
        finally:
            del self.module.forward

    @contextlib.contextmanager
    def serving_from(self, holder: list[Tensor | None]) -> Iterator[None]:
        """Within the block, calling the layer returns ``holder[0]`` (a session's cache), its own forward where None."""
        module = self.module

        def forward(*args, **kwargs):
            z = holder[0]
            return type(module).forward(module, *args, **kwargs) if z is None else z

        module.forward = forward
        try:
            yield
        finally:
            del self.module.forward

    def output_into(self, batch: int, coord: Sequence[float], bufs: tuple[Tensor, Tensor]) -> Tensor:
        """``output(batch, coord)`` written into preallocated ``bufs`` = (result, scratch), the same roundings.

        The result is rewritten from the cache at every call, so a model that modifies the layer's output in
        place (an in-place ReLU) never touches the cache.
        """
        z, tmp = bufs
        y0, *parts = self.outputs[batch]
        started = False
        for c, part in zip(coord, parts):
            if part is None:
                continue
            torch.mul(part, float(c), out=tmp)  # fl(c_k·f₁(x; D_k, e_k)), as ``float(c) * part``
            if started:
                z.add_(tmp)
            else:
                torch.add(y0, tmp, out=z)
                started = True
        if not started:
            z.copy_(y0)
        return z

    def output(self, batch: int, coord: Sequence[float]) -> Tensor:
        """f₁(x_b; θ* + Σ_k c_k d_k) from the cache, the terms added in the order of the directions."""
        y0, *parts = self.outputs[batch]
        z = y0
        for c, part in zip(coord, parts):
            if part is not None:
                z = z + float(c) * part
        return z

    @staticmethod
    def find(ev: PointEvaluator) -> _FirstLayer | None:
        """The trick for ``ev``, or None where it does not apply.

        Applies when the inputs are tensors, the first module of an ``AFFINE_LAYERS`` type called in a forward
        pass is called once and on the input tensor itself (the same storage and shape, found by hooks on a
        one-example forward), the cached outputs fit ``FIRST_LAYER_BYTES``, and the cached combination equals
        the layer evaluated at a test point (relative 1e-5).
        """
        x0 = ev.data[0][0]
        if not all(isinstance(x, Tensor) for x, _ in ev.data) or x0.shape[0] < 1 or ev.bn == "recompute":
            return None
        base = ev.state  # θ*: the probe forward below only finds which layer reads the input
        probe = x0[:1]
        calls: list[tuple[str, nn.Module, bool]] = []

        def hook(name: str):
            def pre(module: nn.Module, args: tuple) -> None:
                a = args[0] if args else None
                same = isinstance(a, Tensor) and a.data_ptr() == probe.data_ptr() and a.shape == probe.shape
                calls.append((name, module, same))
            return pre

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in ev.model.named_modules()
                   if isinstance(m, AFFINE_LAYERS) and not getattr(m, "max_norm", None)]
        try:
            with torch.no_grad(), evaluation_mode(ev.model, "eval"):
                model_outputs(ev.model, probe, params=(base,))
        finally:
            for h in handles:
                h.remove()
        if not calls or not calls[0][2] or sum(m is calls[0][1] for _, m, _ in calls) != 1:
            return None
        name, module, _ = calls[0]
        prefix = f"{name}." if name else ""
        own = {k: k[len(prefix):] for k in base if k.startswith(prefix) and "." not in k[len(prefix):]}
        # the layer's own tensors at the points the cache needs, as point_state computes them (only these names)
        at = lambda c: linear_combination(ev.state, c, ev.dirs, list(own))  # noqa: E731
        base = at([0.0] * len(ev.dirs))

        def layer(params: Mapping[str, Tensor], x: Tensor) -> Tensor:
            return torch.func.functional_call(module, dict(params), (x,))

        outputs, nbytes = [], 0
        with torch.no_grad():
            for x, _ in ev.data:
                row: list[Tensor | None] = [layer({v: base[k] for k, v in own.items()}, x)]
                for d in ev.dirs:
                    touched = [k for k in own if k in d]
                    row.append(layer({v: d[k] if k in d else torch.zeros_like(base[k]) for k, v in own.items()}, x)
                               if touched else None)
                nbytes += sum(t.numel() * t.element_size() for t in row if t is not None)
                if nbytes > FIRST_LAYER_BYTES:
                    return None
                outputs.append(row)
            trick = _FirstLayer(name or "(the model)", module, outputs)
            test = [0.5 + 0.25 * k for k in range(len(ev.dirs))]  # a point off every axis
            state = at(test)
            want = layer({v: state[k] for k, v in own.items()}, ev.data[0][0])
            got = trick.output(0, test)
            if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())):
                return None
        return trick


def default_chunk_size(evaluator: PointEvaluator, device: torch.device | str, budget_bytes: int = 2**30) -> int:
    """Points per vmapped forward: 1 on CPU, else as many as fit ``budget_bytes``, at most 16.

    On CPU vmap measured no faster, and slower for convs (benchmarks/bench_surface.py); on an accelerator
    the count is ``budget_bytes`` over the bytes of one point's stacked moving tensors.
    """
    if torch.device(device).type == "cpu":
        return 1
    per_point = sum(evaluator.state[k].numel() * evaluator.state[k].element_size() for k in evaluator.moving)
    return int(max(1, min(16, budget_bytes // max(per_point, 1))))


def auto_chunk_size(chunk_size: int | None, device: torch.device | str) -> int:
    """``chunk_size`` if given, else 1 on CPU and 16 on an accelerator (see ``default_chunk_size``)."""
    return int(chunk_size) if chunk_size else (1 if torch.device(device).type == "cpu" else 16)


def points_for_rank(n_points: int, rank: int, world_size: int) -> np.ndarray:
    """The flat point indices rank ``rank`` of ``world_size`` evaluates: rank, rank + W, rank + 2W, ..."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return np.arange(rank, n_points, world_size)


def evaluate_grid(
    evaluator: PointEvaluator,
    coords: np.ndarray,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    done: np.ndarray | None = None,
    out: dict[str, np.ndarray] | None = None,
    chunk_size: int = 8,
    on_chunk: Callable[[dict[str, np.ndarray], np.ndarray, int], None] | None = None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Evaluate the points ``indices`` of ``coords`` (shape (n, K)) that ``done`` lacks.

    ``indices`` (default all n) are cut into fixed chunks of ``chunk_size`` consecutive entries; a
    chunk with any missing point is evaluated whole, so values never depend on the resume state.
    ``out`` (arrays of shape (n,), NaN where missing) and ``done`` (bool (n,)) are updated in place
    and returned; ``on_chunk(out, done, n_new)`` runs after every chunk.
    """
    coords = np.atleast_2d(np.asarray(coords, dtype=np.float64))
    n = coords.shape[0]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    idx = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
    done = np.zeros(n, dtype=bool) if done is None else done
    if done.shape != (n,):
        raise ValueError(f"the done mask needs shape ({n},), got {done.shape}")
    if out is None:
        out = {}
    for name in evaluator.names:
        out.setdefault(name, np.full(n, np.nan))
    report(int(done[idx].sum()), len(idx), "points", "surface")  # a resumed grid starts above 0
    # one point per forward: one session (eval mode, swapped tensors, buffers) for every chunk
    per_point = (chunk_size == 1 or not evaluator.vectorized_ok) and not done[idx].all()
    with evaluator.session() if per_point else contextlib.nullcontext():
        _evaluate_chunks(evaluator, coords, idx, done, out, chunk_size, on_chunk)
    return out, done


def _evaluate_chunks(evaluator: PointEvaluator, coords: np.ndarray, idx: np.ndarray, done: np.ndarray,
                     out: dict[str, np.ndarray], chunk_size: int,
                     on_chunk: Callable[[dict[str, np.ndarray], np.ndarray, int], None] | None) -> None:
    """The chunk loop of ``evaluate_grid``."""
    for start in range(0, len(idx), chunk_size):
        chunk = idx[start : start + chunk_size]
        if done[chunk].all():
            continue
        vals = evaluator.evaluate(coords[chunk])
        new = int((~done[chunk]).sum())
        for name, v in vals.items():
            out[name][chunk] = v
        done[chunk] = True
        report(int(done[idx].sum()), len(idx), "points", "surface")
        if on_chunk is not None:
            on_chunk(out, done, new)


def grid_axis(spec: Sequence[float], name: str = "xrange") -> np.ndarray:
    """np.linspace(min, max, num) from a (min, max, num) triple, validated."""
    if len(spec) != 3:
        raise ValueError(f"{name} must be (min, max, num), e.g. (-1, 1, 51); got {tuple(spec)}")
    lo, hi, num = float(spec[0]), float(spec[1]), spec[2]
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{name}: min and max must be finite numbers, got ({lo}, {hi})")
    if not np.isfinite(float(num)) or int(num) != num or int(num) < 1:
        raise ValueError(f"{name}: the number of points must be a positive integer, got {num}")
    if int(num) > 1 and not lo < hi:
        raise ValueError(f"{name}: min must be below max, got ({lo}, {hi})")
    return np.linspace(lo, hi, int(num))


def grid_points(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """Flat grid coordinates in ravel order of Z (ny, nx): point k = (x[k mod nx], y[k div nx])."""
    if y is None:
        return x[:, None]
    X, Y = np.meshgrid(x, y)  # indexing='xy': shape (ny, nx)
    return np.stack([X.ravel(), Y.ravel()], axis=1)
