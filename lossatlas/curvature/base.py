"""The curvature-operator base class: v ↦ Σ_b (n_b/N) M_b(θ) v over a fixed data set.

The base class owns everything that is not the curvature matrix itself (curvlinops' design):
the parameter selection and the point θ, the data loop and its weighting Σ_b (n_b/N) M_b with
unequal batches (the curvature of the mean loss), the train/eval mode (restored after every
use), float64 copies, several vectors at once (vmap with ``chunk_size`` or one reused gradient
graph), the choice between autodiff paths by measurement (per block size, within a memory budget)
with automatic fallback, and the SciPy export.
A subclass writes the per-batch product, once per autodiff path.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from lossatlas.batches import as_batches, batch_length, cat_inputs, inputs_signature, map_inputs, to_device
from lossatlas.checks import check_choice
from lossatlas.curvature.blocks import resolve_params
from lossatlas.distributed import Distributed
from lossatlas.errors import UserError
from lossatlas.losses import batch_count, batch_loss, check_loss_name
from lossatlas.outputs import model_outputs

PATHS: tuple[str, ...] = ("auto", "double_backward", "forward_over_reverse", "finite_difference")
MODES: tuple[str, ...] = ("eval", "train")
# "auto": keep gradient graphs up to graph_cache_bytes, lowered by the memory plan (lossatlas.memory) to what
# fits; "on": up to graph_cache_bytes whatever the plan; "off" (lean): rebuild every graph in every product
GRAPH_CACHE_MODES: tuple[str, ...] = ("auto", "on", "off")

# The exact autodiff paths "auto" chooses between, in the order it tries them when it knows nothing yet.
AUTODIFF_PATHS: tuple[str, ...] = ("double_backward", "forward_over_reverse")
# "auto" no longer switches at a fixed block size: it times both paths on the first real products of
# every block-size bucket and keeps the faster (benchmarks/bench_paths.py). A fixed switch to vmapped
# forward-over-reverse from 8 vectors cost 3.9 gradients per vector on a ResNet-style CNN against 2.25
# for double backward, with 8-10x the extra memory. The name stays importable; nothing reads it.
AUTO_BATCHED_MIN_K = 8
# "auto" runs a single-vector bucket's first AUTO_EXPLORE_RATIO products on the likely winner (double
# backward) and tries the other path on the next one: at K = 1 vmapped forward-over-reverse cost 1.5-3.7
# times double backward with cached graphs (benchmarks/bench_paths.py), so a try on the 21st product adds
# at most (3.7 - 1)/21 ≈ 13 % to a run of 21 products and ≤ 3 % to a 100-product Lanczos run.
# A batched bucket (K ≥ 2) tries it on its second product (AUTO_EXPLORE_BATCHED products first): there
# the paths are within 0.75-1.4x of each other and batched workloads are short (Hutchinson: a few
# products of 16 vectors), so waiting 10 products lost up to 53 % to the faster path. Counts, not a
# clock, so that a rerun takes the same path for every product (bit-identical).
AUTO_EXPLORE_RATIO = 20
AUTO_EXPLORE_BATCHED = 1
# Seconds of a process's first torch.func use (it imports torch._dynamo: 2.4-4.5 s on a 2-core CPU). A batched
# bucket tries forward-over-reverse early only when that start-up is already paid in the process or one product
# takes at least this long; otherwise a short batched workload (a trace of 6 products on a small model) would
# spend 3x its time on an import and then keep double backward.
FOR_STARTUP_S = 3.0
DETERMINISM_EXAMPLES = 64  # examples evaluated twice by the dropout check
# Products run under the math SDPA backend: the fused CPU/CUDA attention kernels have neither double
# backward nor forward-mode AD. Always, not on a first failure: on a model without attention the
# context costs nothing measurable, and with attention the default backend can only fail (on CPU a
# failed try costs about a third of an HVP).
ATTENTION_BACKEND = "math"

_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
_PATH_ERRORS = (RuntimeError, NotImplementedError)


class CurvatureOperator:
    """Symmetric v ↦ Σ_b (n_b/N) M_b(θ) v on parameter space.

    M_b is the Hessian, GGN or Fisher of batch b's mean loss; weighting by n_b/N makes M the curvature
    of the data-set mean loss L = (1/N) Σ_i ℓ_i however unequal the batches are.

    Args:
        model: the network; never mutated, its train/eval flags are restored after every use.
        data: a sequence of ``(inputs, targets)`` batches (anything ``as_batches`` accepts).
        loss: ``"cross_entropy"``, ``"mse"``, ``"half_sse"`` or ``"causal_lm"`` (lossatlas.losses).
        params: None (all trainable parameters), a list of names, a regex, or a dict
            name -> Tensor giving another point; unselected parameters stay at the model's values.
        mode: ``"eval"`` (BatchNorm running stats, dropout off) or ``"train"`` (batch statistics;
            the running stats of the user's module are never updated).
        dtype: None (the model's dtype) or e.g. ``torch.float64``: computes on cast copies.
        device: None (the model's device) or a device for the copies and the data.
        path: ``"auto"`` (default), ``"double_backward"``, ``"forward_over_reverse"`` or
            ``"finite_difference"`` (Hessian only, approximate). ``"auto"`` measures: in every
            block-size bucket (``path_bucket(K)``, the power of two ≥ K vectors) one real product
            runs on each exact path, timed (seconds per vector) and sized (peak extra memory), and
            later products of that bucket take the fastest path whose extra memory fits
            ``memory_budget`` (``op.chosen_path``, ``op.path_timings``, ``op.path_memory``,
            ``op.path_report()``). For one vector the likely winner runs the bucket's first
            ``op.explore_ratio`` (20) products and the other path is tried on the next (a run of ≤ 20
            products never pays the slower path); for K ≥ 2 vectors the other path is tried on the
            bucket's second product (``op.explore_batched``, 1), where the paths are close and
            batched workloads are short. The path's one-off imports in the process (torch.func
            imports torch._dynamo) run before, not inside, a timed product. No product
            is computed twice: the calibration products are the real ones; the paths agree to
            rounding, and within a process the same problem gets the same choice and schedule
            (bit-identical reruns on a fresh operator; the same operator's products may switch
            path once, during calibration, and differ by rounding). A path that raises (an op
            without forward-mode or double-backward support) falls back to the other one, and ``op.path`` reports what ran last. Products run under
            the math SDPA backend
            (``op.attention_backend``): the fused attention kernels have no second-order autodiff;
            before the first product the loss under it is checked against the default backend's.
        chunk_size: vectors per vmap call on the forward-over-reverse path (None: all at once).
        check_deterministic: evaluate the first 64 examples twice before the first product and
            raise ValueError if the outputs differ (dropout or another stochastic layer is active).
        graph_cache_bytes: keep per-batch gradient graphs alive across matmuls while their
            saved tensors total at most this many bytes (default 2 GiB); rebuild them otherwise.
        graph_cache: ``"auto"`` (default: as ``graph_cache_bytes``, which the memory plan
            ``lossatlas.memory.Planner.plan`` lowers, down to 0, when the kept graphs would not fit
            the available memory), ``"on"`` (``graph_cache_bytes`` whatever the plan) or ``"off"``
            (lean: ``graph_cache_bytes = 0``, every product rebuilds its graphs: one gradient's
            forward and ``create_graph`` backward more per product, not per vector; the numbers are
            bit-identical, since the same graph is rebuilt).
        memory_budget: bytes of extra memory (graphs, dual tensors, activations beyond the copies
            of θ and the data) a path chosen by ``"auto"`` may take; None: the memory available
            when the choice is made (free device memory on CUDA, ``MemAvailable`` on Linux CPUs).
            A path whose measured extra memory exceeds it is not chosen while the other fits
            (neither fits: the smaller). Measuring resets the CUDA allocator's peak statistic
            (CPU: the process's resident high-water mark) during calibration products; pass an
            explicit ``path`` when measuring peaks around the operator.

    Construction is cheap: no forward or backward pass runs until the first product.

    Example:
        A linear model under ``half_sse``, L(w) = (1/N) Σ_i ½ (wᵀx_i − y_i)², has H = XᵀX/N and
        ∇L = XᵀX w/N at y = 0:

        >>> import numpy as np, torch
        >>> from torch import nn
        >>> from lossatlas.curvature import HessianOperator
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> _ = nn.init.ones_(model.weight)
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> H = HessianOperator(model, [(X, torch.zeros(2, 1, dtype=torch.float64))], "half_sse")
        >>> H.shape, H.num_params
        ((2, 2), 2)
        >>> loss, grad = H.loss_and_gradient()
        >>> loss, grad.tolist()
        (1.25, [0.5, 2.0])
        >>> H.to_scipy() @ np.ones(2)
        array([0.5, 2. ])
        >>> H.unflatten(torch.tensor([3.0, 4.0], dtype=torch.float64))
        {'weight': tensor([[3., 4.]], dtype=torch.float64)}
    """

    kind: str = ""

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        loss: str = "cross_entropy",
        *,
        params: None | str | Sequence[str] | Mapping[str, Tensor] = None,
        mode: str = "eval",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        path: str = "auto",
        chunk_size: int | None = None,
        check_deterministic: bool = True,
        graph_cache_bytes: int = 2 * 2**30,
        dist: Distributed | None = None,
        coalesce_examples: int = 2048,
        memory_budget: int | None = None,
        graph_cache: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.loss = check_loss_name(loss)
        check_choice("mode", mode, MODES)
        check_choice("path", path, PATHS)
        check_choice("graph_cache", graph_cache, GRAPH_CACHE_MODES)
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        if memory_budget is not None and (
            isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or not memory_budget > 0
        ):
            raise ValueError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype such as torch.float64, got {dtype!r}")
        self.mode = mode
        self.requested_path = path
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.check_deterministic = bool(check_deterministic)
        self.graph_cache = graph_cache
        self.graph_cache_bytes = 0 if graph_cache == "off" else int(graph_cache_bytes)
        self.dist = dist if dist is not None else Distributed()
        self.coalesce_examples = int(coalesce_examples)
        self._model = model
        self._data = data

        names, point = resolve_params(model, params)
        named = dict(model.named_parameters())
        first = named[names[0]]
        self.dtype: torch.dtype = dtype if dtype is not None else first.dtype
        self.device: torch.device = torch.device(device) if device is not None else first.device
        self.param_names: list[str] = names
        self.param_shapes: list[torch.Size] = [named[n].shape for n in names]
        self.num_params: int = sum(math.prod(s) for s in self.param_shapes)
        self.shape: tuple[int, int] = (self.num_params, self.num_params)
        self._point_given = point
        self.matvecs = 0
        self.path: str | None = None  # the path that ran last
        self._failed: dict[str, BaseException] = {}
        self._state: dict[str, Any] | None = None  # point, fixed params, buffers, batches
        self._graphs: dict[int, Any] = {}
        self._graph_bytes = 0
        self._graph_budget_hit = False
        self.attention_backend: str = ATTENTION_BACKEND  # the SDPA backend every product runs under
        self.memory_budget = None if memory_budget is None else int(memory_budget)
        # path="auto" calibration, per block-size bucket (path_bucket(K)): seconds per vector and peak
        # extra bytes (None: not measurable here) of each path's first product, and the path chosen
        self.path_timings: dict[int, dict[str, float]] = {}
        self.path_memory: dict[int, dict[str, int | float | None]] = {}
        self.chosen_path: dict[int, str] = {}
        self.timer = time.perf_counter  # the clock calibration products are timed with
        self.explore_ratio = AUTO_EXPLORE_RATIO  # products of bucket 1 before its second path is tried
        self.explore_batched = AUTO_EXPLORE_BATCHED  # the same for buckets of K ≥ 2 vectors (at most explore_ratio)
        self._bucket_products: dict[int, int] = {}  # products path="auto" has run per bucket
        self._kept_build_s = 0.0  # seconds spent building gradient graphs that were then cached
        self._timing_builds = False  # whether _matmat_double_backward times its graph builds now
        self.calls_attention: bool | None = None  # whether the model calls SDPA (known after the first use)

    # ------------------------------------------------------------------ setup (lazy)
    def _cast(self, t: Tensor) -> Tensor:
        t = t.detach()
        if t.is_floating_point():
            return t.to(device=self.device, dtype=self.dtype, copy=True)
        return t.to(device=self.device, copy=True)

    def _ready(self) -> dict[str, Any]:
        """Copies of θ, the fixed parameters, buffers and the batches; the determinism check."""
        if self._state is not None:
            return self._state
        model = self._model
        src = self._point_given or {}
        point = {n: self._cast(src[n] if n in src else p) for n, p in model.named_parameters() if n in self.param_names}
        point = {n: point[n] for n in self.param_names}
        fixed = {n: self._cast(p) for n, p in model.named_parameters() if n not in point}
        buffers = {n: self._cast(b) for n, b in model.named_buffers()}
        if self.mode == "train":
            # batch statistics; passing None keeps BatchNorm from touching any running stat
            for mod_name, mod in model.named_modules():
                if isinstance(mod, nn.modules.batchnorm._NormBase):
                    for stat in _BN_STATS:
                        key = f"{mod_name}.{stat}" if mod_name else stat
                        if key in buffers:
                            buffers[key] = None
        raw = self._data
        if isinstance(raw, (list, tuple)) and raw and all(
            isinstance(b, (list, tuple)) and len(b) == 2 and isinstance(b[0], (Tensor, Mapping)) for b in raw
        ):
            batches = list(raw)
        else:
            batches = as_batches(raw)
        batches = to_device(batches, self.device, self.dtype)
        counts = [batch_count(self.loss, y) for _, y in batches]
        total = sum(counts)
        if total == 0:
            raise ValueError("the data holds no examples")
        weights = [c / total for c in counts]
        if self.dist.active:  # data parallel: this rank's batches, weighted by the global count
            mine = self.dist.shard(batches)
            batches, counts, weights = [batches[i] for i in mine], [counts[i] for i in mine], [weights[i] for i in mine]
        if self.mode == "eval" and self.coalesce_examples > 0:
            batches, counts, weights = _coalesce(batches, counts, weights, self.coalesce_examples)
        self._state = {
            "point": point,
            "fixed": fixed,
            "buffers": buffers,
            "batches": batches,
            "counts": counts,
            "weights": weights,
            "total": total,
        }
        if self.check_deterministic:
            try:
                self._check_deterministic()
            except ValueError:
                self._state = None
                raise
        try:
            self._check_attention_backend()
        except ValueError:
            self._state = None
            raise
        return self._state

    def _check_attention_backend(self) -> None:
        """Whether the model calls SDPA; if so, its loss under the math backend must equal the default's.

        On the first ``DETERMINISM_EXAMPLES`` examples, |L_math − L_default| ≤ √ε_dtype · max(1, |L|):
        the backends differ only by rounding. Costs one small forward pass, two with attention.
        """
        if not self._state["batches"]:
            return  # a rank without a data shard
        x, y = self._state["batches"][0]
        x, y = map_inputs(lambda t: t[:DETERMINISM_EXAMPLES], x), y[:DETERMINISM_EXAMPLES]
        point = self._state["point"]
        spy = _AttentionSpy()
        with torch.no_grad(), self._modes():
            with torch.random.fork_rng(devices=[]), spy:
                default = float(self._batch_loss(point, x, y))
            self.calls_attention = spy.called
            if not spy.called:
                return
            with torch.random.fork_rng(devices=[]), sdpa_kernel(SDPBackend.MATH):
                math_loss = float(self._batch_loss(point, x, y))
        tol = float(torch.finfo(self.dtype).eps) ** 0.5 * max(1.0, abs(default))
        if not abs(math_loss - default) <= tol:
            raise ValueError(
                f"the model's loss differs between the default attention backend ({default!r}) and the math "
                f"backend the curvature products use ({math_loss!r}); compute in float64 (dtype=torch.float64)"
            )

    def _check_deterministic(self) -> None:
        """Two evaluations of the first ``DETERMINISM_EXAMPLES`` examples must agree bit for bit.

        Dropout draws a fresh mask per element, so a few dozen examples expose it with certainty;
        the check costs two small forward passes, not two over a whole (coalesced) batch.
        """
        if not self._state["batches"]:
            return  # a rank without a data shard
        x, _ = self._state["batches"][0]
        x = map_inputs(lambda t: t[:DETERMINISM_EXAMPLES], x)
        with torch.no_grad(), self._modes(), torch.random.fork_rng(devices=[]):
            a = self._forward(self._state["point"], x)
            b = self._forward(self._state["point"], x)
        if not torch.equal(a, b):
            raise ValueError(
                f"the model's output differs between two identical evaluations in mode={self.mode!r} "
                "(dropout or another stochastic layer is active); use mode='eval' or disable dropout"
            )

    def _modes(self):
        """Put the model in ``self.mode`` for a block and restore every submodule's own flag afterwards."""
        return training_flag(self._model, self.mode)

    # ------------------------------------------------------------------ evaluation helpers
    def _forward(self, theta: Mapping[str, Tensor], x: Tensor | Mapping[str, Tensor]) -> Tensor:
        """f(x; θ) by functional_call on copies (train mode: fresh buffer copies, no BN stats).

        Dict inputs are keyword arguments; the output tensor is picked by ``model_outputs``.
        """
        st = self._state
        buffers = st["buffers"]
        if self.mode == "train":
            buffers = {k: (None if v is None else v.clone()) for k, v in buffers.items()}
        return model_outputs(self._model, x, params={**st["fixed"], **buffers, **theta})

    def _batch_loss(self, theta: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """The batch's mean loss L_b(θ)."""
        return batch_loss(self.loss, self._forward(theta, x), y)

    def _leaves(self) -> dict[str, Tensor]:
        """θ as leaf tensors that require grad (shared by every cached graph)."""
        st = self._state
        if "leaves" not in st:
            st["leaves"] = {n: t.detach().requires_grad_(True) for n, t in st["point"].items()}
        return st["leaves"]

    # ------------------------------------------------------------------ public API
    def point(self) -> dict[str, Tensor]:
        """The parameters at which the curvature is taken (detached copies, in ``dtype``)."""
        return {n: t.clone() for n, t in self._ready()["point"].items()}

    def flatten(self, tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (dict by name, or list in ``param_names`` order) to (P,)."""
        if isinstance(tensors, Mapping):
            missing = [n for n in self.param_names if n not in tensors]
            if missing:
                raise ValueError(f"flatten: missing parameter(s) {', '.join(missing)}")
            tensors = [tensors[n] for n in self.param_names]
        tensors = list(tensors)
        if len(tensors) != len(self.param_names):
            raise ValueError(f"flatten: expected {len(self.param_names)} tensors, got {len(tensors)}")
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a (P,) vector (or (P, K)) into per-parameter tensors (shape + (K,) trailing)."""
        if vec.shape[0] != self.num_params:
            raise ValueError(f"unflatten: expected a vector of length {self.num_params}, got shape {tuple(vec.shape)}")
        out, start = {}, 0
        tail = tuple(vec.shape[1:])
        for n, s in zip(self.param_names, self.param_shapes):
            k = math.prod(s)
            out[n] = vec[start : start + k].reshape(*s, *tail)
            start += k
        return out

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """Full-data mean loss L(θ) = Σ_b (n_b/N) L_b(θ) and its flat gradient ∇L (P,)."""
        st = self._ready()
        leaves = {n: t.detach().requires_grad_(True) for n, t in st["point"].items()}
        total_loss = 0.0
        grad = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        with self._modes():
            for (x, y), w in zip(st["batches"], st["weights"]):
                loss = self._batch_loss(leaves, x, y)
                gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                grad += w * self._flat_grads(gs)
                total_loss += w * float(loss.detach())
        if self.dist.active:  # the ranks' partial sums over their data shards
            summed = self.dist.all_reduce_tensor(torch.cat([grad, grad.new_tensor([total_loss])]))
            grad, total_loss = summed[:-1], float(summed[-1])
        return total_loss, grad

    def __matmul__(self, V: Tensor) -> Tensor:
        if not isinstance(V, Tensor):
            raise ValueError(f"{type(self).__name__} @ V needs a torch.Tensor, got {type(V).__name__}")
        if V.ndim not in (1, 2) or V.shape[0] != self.num_params:
            raise ValueError(
                f"{type(self).__name__} @ V: V must have shape ({self.num_params},) or ({self.num_params}, K), "
                f"got {tuple(V.shape)}"
            )
        self._ready()
        vec = V.ndim == 1
        M = V.reshape(self.num_params, -1).detach().to(device=self.device, dtype=self.dtype)
        K = M.shape[1]
        if K == 0:
            return torch.zeros_like(M)
        with self._modes():
            with sdpa_kernel(SDPBackend.MATH):
                out = self._run_paths(M)
        out = self.dist.all_reduce_tensor(out)  # Σ over the ranks' data shards (no-op alone)
        self.matvecs += K
        return out.reshape(-1) if vec else out

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out; symmetric)."""
        from scipy.sparse.linalg import LinearOperator

        def matmat(X):
            X = np.asarray(X, dtype=np.float64)
            Y = self @ torch.as_tensor(X).to(device=self.device, dtype=self.dtype)
            return Y.detach().cpu().to(torch.float64).numpy()

        def matvec(x):
            return matmat(np.asarray(x).reshape(-1)).reshape(-1)

        return LinearOperator(
            self.shape, matvec=matvec, rmatvec=matvec, matmat=matmat, rmatmat=matmat, dtype=np.float64
        )

    def clear_cache(self) -> None:
        """Free the gradient graphs (and per-example gradients) kept across matmuls."""
        self._graphs.clear()
        self._graph_bytes = 0
        self._graph_budget_hit = False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(P={self.num_params}, loss={self.loss!r}, mode={self.mode!r}, "
            f"dtype={self.dtype}, path={self.path or self.requested_path!r})"
        )

    # ------------------------------------------------------------------ path dispatch
    def path_report(self) -> dict[str, Any]:
        """What ``path="auto"`` measured and chose, JSON-ready (for a result's metadata).

        ``{"requested": path, "chosen": {bucket: path}, "untried": {bucket: [paths]},
        "seconds_per_vector": {bucket: {path: s}}, "extra_bytes": {bucket: {path: bytes or None}}}``
        with buckets as strings (``path_bucket``). ``chosen`` also names, for a bucket whose other
        path was not yet worth trying (``untried``), the measured path it ran on. Empty dicts for an
        explicit path (nothing is measured then).
        """

        def finite(x):
            return None if x is None else (float(x) if math.isfinite(x) else str(x))

        chosen, untried = dict(self.chosen_path), {}
        for b, ts in self.path_timings.items():
            if b not in chosen and ts:
                chosen[b] = min(ts, key=lambda p: ts[p])
                untried[str(b)] = [p for p in self._working_paths() if p not in ts]
        return {
            "requested": self.requested_path,
            "chosen": {str(b): p for b, p in sorted(chosen.items())},
            "untried": untried,
            "seconds_per_vector": {
                str(b): {p: finite(t) for p, t in ts.items()} for b, ts in sorted(self.path_timings.items())
            },
            "extra_bytes": {
                str(b): {p: None if m is None else (int(m) if math.isfinite(m) else str(m)) for p, m in ms.items()}
                for b, ms in sorted(self.path_memory.items())
            },
        }

    def _run_paths(self, M: Tensor) -> Tensor:
        if self.requested_path == "finite_difference":  # explicit only: approximate, by choice
            self.path = "finite_difference"
            return self._matmat_finite_difference(M)
        if self.requested_path == "auto":
            return self._run_auto(M)
        first = self.requested_path
        for p in (first, _other_path(first)):
            if p in self._failed:
                continue
            try:
                out = self._product(p, M)
            except _PATH_ERRORS as exc:  # an op without this autodiff mode: use the other path
                self._mark_failed(p, exc)
                continue
            self.path = p
            return out
        raise self._no_path_error()

    def _run_auto(self, M: Tensor) -> Tensor:
        """The product on the bucket's chosen path, or on the path its calibration needs next.

        Until a bucket's choice is made every product is timed and sized (``_measure``); the first
        sample of each path is its calibration. A path that raises is marked failed for good and the
        other one runs (as for an explicit path); a path that runs out of memory while being
        calibrated is only ruled out for this bucket (recorded as an infinite time and size).
        """
        bucket = path_bucket(M.shape[1])
        while True:
            p = self._auto_path(bucket)
            if p is None:
                raise self._no_path_error()
            calibrating = bucket not in self.chosen_path
            try:
                if calibrating:
                    timings = self.path_timings.setdefault(bucket, {})
                    sample = p not in timings  # this path's first product in the bucket: its calibration
                    out, seconds, extra = self._measure(p, M, size=sample)
                    if sample:
                        timings[p] = seconds / M.shape[1]
                        self.path_memory.setdefault(bucket, {})[p] = extra
                        self._choose_when_timed(bucket)
                else:
                    out = self._product(p, M)
            except torch.OutOfMemoryError as exc:
                if not calibrating:
                    self._mark_failed(p, exc)
                    continue
                self.path_timings.setdefault(bucket, {})[p] = math.inf
                self.path_memory.setdefault(bucket, {})[p] = math.inf
                if p == "double_backward":
                    self.clear_cache()
                self._choose_when_timed(bucket)
                continue
            except _PATH_ERRORS as exc:  # an op without this autodiff mode: use the other path
                self._mark_failed(p, exc)
                continue
            self.path = p
            self._bucket_products[bucket] = self._bucket_products.get(bucket, 0) + 1
            return out

    def _working_paths(self) -> list[str]:
        return [p for p in AUTODIFF_PATHS if p not in self._failed]

    def _auto_path(self, bucket: int) -> str | None:
        """The path for the bucket's next product (None: no path works).

        Its chosen path if it still works. Else, with nothing measured in the bucket, the nearest
        calibrated bucket's choice (else ``AUTODIFF_PATHS[0]``): the likely winner runs first. With
        one path measured, the untried one runs once the bucket has run ``explore_ratio`` products
        (20), or ``explore_batched`` products (1: the second product) in a bucket of K ≥ 2 vectors whose
        untried path already ran in this process or whose product takes ≥ ``FOR_STARTUP_S`` (3 s, the
        first torch.func use's imports), the measured path until then. The schedule counts products, never a clock, so a rerun on a fresh
        operator runs every product on the same path (the same operator's second product of a batched
        bucket may run on the other path and differ from its first by rounding).
        """
        working = self._working_paths()
        if not working:
            return None
        chosen = self.chosen_path.get(bucket)
        if chosen in working:
            return chosen
        timed = self.path_timings.get(bucket, {})
        untimed = [p for p in working if p not in timed]
        if not untimed:
            self._choose(bucket, working)
            return self.chosen_path[bucket]
        usable = [p for p in working if p in timed and math.isfinite(timed[p])]
        if not usable:  # nothing measured in this bucket yet (or it ran out of memory)
            near = sorted(self.chosen_path, key=lambda b: (abs(math.log2(b) - math.log2(bucket)), b))
            prior = self.chosen_path[near[0]] if near else AUTODIFF_PATHS[0]
            return min(untimed, key=lambda p: (p != prior, AUTODIFF_PATHS.index(p)))
        known = min(usable, key=lambda p: timed[p])
        early = bucket > 1 and all(p in _WARM or timed[known] * bucket >= FOR_STARTUP_S for p in untimed)
        wait = min(self.explore_ratio, self.explore_batched) if early else self.explore_ratio
        return untimed[0] if self._bucket_products.get(bucket, 0) >= wait else known

    def _choose_when_timed(self, bucket: int) -> None:
        working = self._working_paths()
        if working and all(p in self.path_timings.get(bucket, {}) for p in working):
            self._choose(bucket, working)

    def _measure(self, path: str, M: Tensor, size: bool = True) -> tuple[Tensor, float, int | None]:
        """The product on ``path``, its seconds and (``size``) its peak extra bytes (None: not measured).

        The seconds leave out the path's one-off start-up in the process (``_warm_up``) and building
        gradient graphs that stay cached: they are built once and
        reused by every later product, so the steady cost of double backward is the second backward
        alone. Its extra bytes are at least the saved tensors of its cached graphs (counted exactly
        by ``_build_counted``, also when they were built by an earlier product).
        """
        _warm_up(path)  # a process's first use imports modules: a one-off, not the path's cost
        held = self._graph_bytes if path == "double_backward" else 0
        meter = _PeakMemory(self.device) if size else contextlib.nullcontext()
        build0 = self._kept_build_s
        self._timing_builds = True
        try:
            with meter:
                t0 = self.timer()
                out = self._product(path, M)
                _synchronize(self.device)
                seconds = self.timer() - t0
        finally:
            self._timing_builds = False
        seconds = max(seconds - (self._kept_build_s - build0), 0.0)
        extra = meter.extra if size else None
        if size and path == "double_backward":
            extra = max(held + (extra or 0), self._graph_bytes)
        return out, seconds, extra

    def _choose(self, bucket: int, working: list[str]) -> None:
        """The fastest path whose extra memory fits the budget (none fits: the smallest), into ``chosen_path``.

        Ties go to ``AUTODIFF_PATHS`` order. The first choice made in this process for the same
        problem (``_choice_key``: curvature, architecture, parameter shapes, data shapes, dtype,
        device, mode, loss and block-size bucket) is reused, so that rerunning an analysis in a
        process gives bit-identical numbers (the paths differ by rounding). Under torchrun rank 0's
        choice is every rank's, so the ranks run the same path.
        """
        key = self._choice_key(bucket)
        if _CHOICES.get(key) in working:
            self.chosen_path[bucket] = _CHOICES[key]
            self._drop_unused_graphs()
            return
        times = self.path_timings.get(bucket, {})
        sizes = self.path_memory.get(bucket, {})
        budget = self.memory_budget if self.memory_budget is not None else available_memory(self.device)
        fits = [p for p in working if sizes.get(p) is None or sizes[p] <= budget]
        pool = fits or [min(working, key=lambda p: sizes[p])]
        choice = min(pool, key=lambda p: (times.get(p, math.inf), AUTODIFF_PATHS.index(p)))
        self.chosen_path[bucket] = _CHOICES[key] = self.dist.broadcast(choice)
        self._drop_unused_graphs()

    def _drop_unused_graphs(self) -> None:
        """Free the calibration's kept gradient graphs once no bucket's choice is double backward.

        Forward-over-reverse never reads them; a later bucket that takes double backward rebuilds them
        (one gradient's forward and ``create_graph`` backward per batch).
        """
        if self._graphs and "double_backward" not in self.chosen_path.values():
            self.clear_cache()

    def _choice_key(self, bucket: int) -> tuple:
        """What identifies the problem whose path choice is shared within the process."""
        batches = tuple(
            (inputs_signature(x), batch_length(x), tuple(y.shape), str(y.dtype)) for x, y in self._state["batches"]
        ) if self._state is not None else ()
        return (
            self.kind, type(self).__name__, type(self._model).__qualname__,
            tuple(zip(self.param_names, map(tuple, self.param_shapes))), batches, str(self.dtype),
            str(self.device), self.mode, self.loss, self.chunk_size, self.graph_cache_bytes,
            self.memory_budget, bucket,
        )

    def _product(self, path: str, M: Tensor) -> Tensor:
        out = self._matmat_double_backward(M) if path == "double_backward" else self._matmat_functional(M)
        _WARM.add(path)  # its one-off imports are done in this process
        return out

    def _mark_failed(self, path: str, exc: BaseException) -> None:
        self._failed[path] = exc
        if path == "double_backward":
            self.clear_cache()

    def _no_path_error(self) -> UserError:
        causes = "; ".join(f"{k}: {type(e).__name__}: {e}" for k, e in self._failed.items())
        return UserError(
            f"{type(self).__name__}: neither double backward nor forward-over-reverse works for this model "
            f"({causes}); replace the ops without double-backward/forward-mode support (a custom fused kernel), "
            "or use path='finite_difference' for Hessian products"
        )

    def _matmat_finite_difference(self, M: Tensor) -> Tensor:
        """Hv ≈ (∇L(θ + εv) − ∇L(θ − εv)) / 2ε per column: gradient memory only, no second-order graph.

        With ε = ε_mach^{1/3}·max(1, ‖θ‖)/‖v‖ the truncation error (ε²/6)‖∇³L[v, v]‖ and the rounding
        error ~ε_mach‖∇L‖/ε balance at a relative error of order ε_mach^{2/3} (≈ 2e-5 in float32,
        ≈ 4e-11 in float64), for the Hessian only: (∇L(θ + εv) − ∇L(θ − εv))/(2ε), a cross-check.
        """
        if self.kind != "hessian":
            raise UserError(f"path='finite_difference' approximates Hessian products only, not the {self.kind}")
        st = self._state
        theta = st["point"]
        flat_theta = self.flatten(theta)
        base_eps = float(torch.finfo(self.dtype).eps) ** (1 / 3) * max(1.0, float(flat_theta.norm()))
        out = torch.zeros_like(M)
        for k in range(M.shape[1]):
            v = M[:, k]
            vnorm = float(v.norm())
            if vnorm == 0.0:
                continue
            eps = base_eps / vnorm
            grads = []
            for sign in (1.0, -1.0):
                shifted = self.unflatten(flat_theta + sign * eps * v)
                leaves = {n: t.detach().requires_grad_(True) for n, t in shifted.items()}
                g = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
                for (x, y), w in zip(st["batches"], st["weights"]):
                    loss = self._batch_loss(leaves, x, y)
                    g += w * self._flat_grads(torch.autograd.grad(loss, list(leaves.values()), allow_unused=True))
                grads.append(g)
            out[:, k] = (grads[0] - grads[1]) / (2 * eps)
        return out

    def _matmat_functional(self, M: Tensor) -> Tensor:
        """Σ_b w_b M_b V by torch.func, vmapped over the K columns in chunks."""
        st = self._state
        point = st["point"]
        V = self.unflatten(M)  # name -> (*shape, K)
        V = {n: v.movedim(-1, 0) for n, v in V.items()}  # name -> (K, *shape)
        out = torch.zeros(M.shape[1], self.num_params, dtype=self.dtype, device=self.device)
        for (x, y), n_b, w in zip(st["batches"], st["counts"], st["weights"]):
            product = self._functional_batch_product(point, x, y, n_b)
            res = torch.func.vmap(product, chunk_size=self.chunk_size)(V)
            out += w * torch.cat([res[n].reshape(M.shape[1], -1) for n in self.param_names], dim=1)
        return out.T.contiguous()

    def _matmat_double_backward(self, M: Tensor) -> Tensor:
        """Σ_b w_b M_b V by reverse-over-reverse autograd, one graph per batch reused over vectors."""
        st = self._state
        leaves = self._leaves()
        cols = [self.unflatten(M[:, k]) for k in range(M.shape[1])]
        # (K, P): row k is the product with column k, written in place by the first batch (zeros on a
        # rank without a data shard, whose part of the all-reduced sum is zero)
        out = torch.empty_like(M.T) if st["batches"] else torch.zeros_like(M.T)
        for b, ((x, y), n_b, w) in enumerate(zip(st["batches"], st["counts"], st["weights"])):
            graph = self._graphs.get(b)
            keep = graph is not None
            if graph is None:
                t0 = self.timer() if self._timing_builds else 0.0
                graph, nbytes = self._build_counted(leaves, x, y, n_b)
                if not self._graph_budget_hit and self._graph_bytes + nbytes <= self.graph_cache_bytes:
                    self._graphs[b] = graph
                    self._graph_bytes += nbytes
                    keep = True
                    if self._timing_builds:  # a one-off cost: later products reuse this graph
                        _synchronize(self.device)
                        self._kept_build_s += self.timer() - t0
                else:
                    self._graph_budget_hit = True
            for k, v in enumerate(cols):
                retain = keep or k < len(cols) - 1
                parts = self._graph_batch_product(graph, leaves, x, y, n_b, v, retain)
                if b == 0:
                    self._flat_grads(parts, out=out[k])
                    if w != 1.0:
                        out[k].mul_(w)
                else:
                    out[k].add_(self._flat_grads(parts), alpha=w)
        return out.T

    def _build_counted(self, leaves, x, y, n_b) -> tuple[Any, int]:
        """Build a batch's graph, counting the bytes of the tensors autograd saves for it."""
        seen: set[int] = set()
        total = [0]

        def pack(t: Tensor) -> Tensor:
            try:
                key = t.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):
                key = id(t)
            if key not in seen:
                seen.add(key)
                total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            graph = self._build_graph(leaves, x, y, n_b)
        return graph, total[0]

    def _flat_grads(self, grads: Sequence[Tensor | None], out: Tensor | None = None) -> Tensor:
        """Per-parameter tensors (None: zero) concatenated to (P,), into ``out`` when given."""
        leaves = self._state["point"]
        parts = [
            (torch.zeros_like(leaves[n]) if g is None else g).reshape(-1) for n, g in zip(self.param_names, grads)
        ]
        return torch.cat(parts) if out is None else torch.cat(parts, out=out)

    # ------------------------------------------------------------------ what a subclass writes
    def _functional_batch_product(self, theta, x, y, n_b):
        """A function v -> M_b v on dicts, composable with torch.func (vmapped by the base)."""
        raise NotImplementedError

    def _build_graph(self, leaves, x, y, n_b) -> Any:
        """Build (with create_graph) what the double-backward product of batch b reuses."""
        raise NotImplementedError

    def _graph_batch_product(self, graph, leaves, x, y, n_b, v, retain: bool) -> Sequence[Tensor | None]:
        """M_b v per parameter (None: zero) from the batch's graph; keep the graph when ``retain``."""
        raise NotImplementedError


def path_bucket(K: int) -> int:
    """The block-size bucket whose path choice ``path="auto"`` shares among K vectors: the power of two ≥ K.

    >>> [path_bucket(k) for k in (1, 2, 3, 8, 9, 16)]
    [1, 2, 4, 8, 16, 16]
    """
    return 1 << (int(K) - 1).bit_length()


def _other_path(path: str) -> str:
    return "forward_over_reverse" if path == "double_backward" else "double_backward"


_WARM: set[str] = set()  # the paths whose autodiff machinery already ran in this process
_CHOICES: dict[tuple, str] = {}  # path="auto" choices made in this process, by CurvatureOperator._choice_key


def _warm_up(path: str) -> None:
    """Run the path's autodiff once on a 2-element function (once per process).

    The module imports a path's first use in a process triggers then happen here, not inside a
    timed product (measured on a 2-core CPU: the first create_graph gradient imports sympy,
    1.0-1.4 s; the first torch.func call imports torch._dynamo, 2.4-4.5 s).
    """
    if path in _WARM:
        return
    x = torch.ones(2, dtype=torch.float64)
    if path == "double_backward":
        leaf = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((leaf**3).sum(), leaf, create_graph=True)
        torch.autograd.grad(g, leaf, torch.ones_like(g))
    else:
        from torch.func import grad, jvp, vmap

        def cube(t):
            return (t**3).sum()

        vmap(lambda v: jvp(grad(cube), (x,), (v,))[1])(torch.ones(2, 2, dtype=torch.float64))
    _WARM.add(path)


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs asynchronously; a timer must not stop early)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


@contextlib.contextmanager
def training_flag(model: nn.Module, mode: str):
    """Put ``model`` in ``mode`` ("train" | "eval") for the block and restore every submodule's own flag after.

    Only the modules whose flag differs are touched (a product on a model already in the right mode costs
    no attribute writes).
    """
    want = mode == "train"
    changed = [m for m in model.modules() if m.training != want]
    for m in changed:
        m.training = want
    try:
        yield
    finally:
        for m in changed:
            m.training = not want


def available_memory(device: torch.device) -> float:
    """Bytes a new allocation can take now (the default ``memory_budget``).

    Free CUDA memory plus the allocator's cached free blocks; ``MemAvailable`` on a Linux CPU, else
    psutil's ``available``; infinity where unknown (no budget is then enforced by default).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        return math.inf


class _PeakMemory:
    """Peak extra memory while the block runs, in bytes (``extra``; None where it cannot be measured).

    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus the allocation on entry
    (exact). CPU on Linux: the resident high-water mark (``VmHWM``, reset by writing 5 to
    ``/proc/self/clear_refs``) minus the resident size on entry: the memory the product newly made
    resident (pages count when touched). Free memory the allocator already held and reuses is not
    counted, so on a CPU this is a lower bound; it is not trimmed first (``malloc_trim``) because
    the page faults that follow would slow the very product being timed. Elsewhere: None.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base: int | None = None
        self.extra: int | None = None

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu":
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak resident size to the current one
                self.base = _proc_status_bytes("VmRSS")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.base is None or exc[0] is not None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra = max(0, torch.cuda.max_memory_allocated(self.device) - self.base)
        else:
            peak = _proc_status_bytes("VmHWM")
            self.extra = None if peak is None else max(0, peak - self.base)


def _coalesce(batches: list, counts: list[int], weights: list[float], limit: int) -> tuple[list, list, list]:
    """Merge consecutive batches into batches of at most ``limit`` examples (eval mode only).

    Σ_b (n_b/N) L_b is unchanged: a merged batch's mean loss times (Σ n_b)/N is the same sum, and in
    eval mode no layer couples the examples of a batch. Fewer, larger batches make each HVP cheaper
    (fewer kernel launches and graph nodes); the unmerged weighting stays exact either way.
    """
    out_b, out_c, out_w = [], [], []
    for (x, y), c, w in zip(batches, counts, weights):
        if out_b:
            px, py = out_b[-1]
            fits = batch_length(px) + batch_length(x) <= limit
            same = inputs_signature(px) == inputs_signature(x) and py.shape[1:] == y.shape[1:] and py.dtype == y.dtype
            if fits and same:
                out_b[-1] = (cat_inputs(px, x), torch.cat([py, y]))
                out_c[-1] += c
                out_w[-1] += w
                continue
        out_b.append((x, y))
        out_c.append(c)
        out_w.append(w)
    return out_b, out_c, out_w


def grad_or_zeros(outputs: Sequence[Tensor], inputs: Sequence[Tensor], grad_outputs: Sequence[Tensor], retain: bool):
    """autograd.grad that skips outputs without a graph and returns None for unused inputs."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
    if not pairs:
        return [None] * len(inputs)
    outs, gos = zip(*pairs)
    return torch.autograd.grad(outs, list(inputs), list(gos), retain_graph=retain, allow_unused=True)


class _AttentionSpy(TorchFunctionMode):
    """Notes whether scaled_dot_product_attention (or the fused multi-head attention path) is called."""

    _ATTENTION = (torch.nn.functional.scaled_dot_product_attention, torch._native_multi_head_attention)

    def __init__(self) -> None:
        super().__init__()
        self.called = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._ATTENTION:
            self.called = True
        return func(*args, **(kwargs or {}))
