"""The memory plan of a long curvature computation: what it will need, checked before it starts.

Before the hessian probe (top-k, trace, density) or eigenspace tracking spends its products, the plan
adds up what the run will hold at its peak, per device:

    peak = state + graphs + max over phases (basis + max(product, estimator workspace))

- ``state``: the operator's copies of θ, the fixed parameters, buffers and data (counted exactly
  after the operator is set up: storages it does not share with the model or the data);
- ``graphs``: the per-batch gradient graphs double backward keeps across products (Pearlmutter 1994,
  "Fast exact multiplication by the Hessian": one ``create_graph`` gradient, then a second backward
  per vector). Their saved tensors are counted with ``torch.autograd.graph.saved_tensors_hooks``
  around one gradient on two slices of the largest batch (n₁ < n₂ examples) and extrapolated
  linearly, a(n) = a(n₁) + (n − n₁)(a(n₂) − a(n₁))/(n₂ − n₁), plus the P gradient values each graph
  holds (for the GGN and Fisher operators the Hessian's graph stands in for theirs); graphs are kept
  while they total at most the operator's ``graph_cache_bytes`` and the rest are rebuilt per product.
  Lean mode (``graph_cache="off"``, or ``"auto"`` when the kept graphs would not fit: ``Planner.plan``
  then lowers ``graph_cache_bytes`` to the largest prefix of the graphs that fits, down to none) keeps
  fewer or none: the largest rebuilt graph then enters ``product`` instead. A rebuilt graph exists
  only during its product, so lean mode saves the kept graphs of every other batch and the memory
  between products, not the peak of one product over one batch (a double-backward product holds the
  graph, ~2× one gradient's saved activations, while the gradient frees them as it goes; measured in
  ``benchmarks/bench_memory.py``). Gradient checkpointing is honoured: tensors the checkpointed regions
  do not keep are not seen by the hooks (inner hooks take precedence), so a finite-difference plan
  of a checkpointed model is smaller; a double-backward graph recomputes and keeps them;
- ``product``: one product's transient memory, measured on CPU float32 MLPs at (K + 1)·P values for K
  vectors (the output and one vector's parameter gradients) plus the second backward's
  activation gradients ≈ the graph's activations; finite differences hold two gradients, the shifted
  point and their autograd graph instead (no ``create_graph``);
- ``basis``: the Lanczos basis, R runs × rows × P values (rows = max_iter·b for top-k, num_steps for
  SLQ), grown by doubling from 32 rows, so old and new arrays coexist while it grows; on
  ``basis_device="cpu"`` it is host memory, on ``"disk"`` a memory-mapped file (none resident);
- ``workspace``: the estimator's own matrices: Ritz vectors (2·k·P), the float64 chunks of the
  reorthogonalization (at most 2²² doubles), the trace sketches (XTrace: Ω, AΩ, Q, AQ and the
  float64 QR of AΩ, m = matvecs/2 columns each; Epperly, Tropp & Webber 2024).

The estimate is compared with the measured growth of the resident high-water mark
(``tests/test_memory_plan.py``: the plan is 0.92–1.01 times it on float64 MLPs of 1.1M, 4.3M and 16.6M
parameters; the test asks 25 %). The available memory is ``torch.cuda.mem_get_info`` on
a GPU, ``MemAvailable`` of /proc/meminfo (or psutil) on a CPU, or the ``LOSSATLAS_MEMORY_LIMIT``
environment variable ("8GB", "512MiB", bytes) when set. A plan that does not fit raises a
``UserError`` naming the options that would: ``--basis-device cpu|disk``, ``--graph-cache off``,
``--path finite_difference`` (approximate; never chosen silently), ``--max-examples N``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from lossatlas.batches import batch_length, map_inputs
from lossatlas.curvature.base import available_memory as base_available_memory
from lossatlas.errors import UserError

MEMORY_LIMIT_ENV = "LOSSATLAS_MEMORY_LIMIT"  # bytes the planner may assume available (overrides the measured)
BASIS_DEVICES: tuple[str, ...] = ("cpu", "disk")  # where a Lanczos basis may live besides the operator's device
HALF_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
_INITIAL_ROWS = 32  # Lanczos basis rows allocated up front (lossatlas.estimators._recurrence)
_GRAM_CHUNK = (1 << 22) * 8  # bytes of the float64 chunks the reorthogonalization upcasts at a time
_SLICE = 8  # examples in the larger slice a graph is measured on
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


# ---- the numbers a plan starts from -------------------------------------------------------------------
def parse_bytes(text: str | int | float) -> int:
    """Bytes from ``"8GB"``, ``"512MiB"``, ``"1.5e9"`` or a number (decimal units; ``iB`` binary).

    >>> parse_bytes("2GB"), parse_bytes("1KiB"), parse_bytes(300)
    (2000000000, 1024, 300)
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise UserError(f"{MEMORY_LIMIT_ENV}={text!r} is not a size; give bytes or e.g. 8GB, 512MiB")
        value, unit = float(m.group(1)), m.group(2).lower()
    out = value * _UNITS[unit]
    if not (math.isfinite(out) and out > 0):
        raise UserError(f"{MEMORY_LIMIT_ENV}={text!r} must be a positive size; give bytes or e.g. 8GB")
    return int(out)


def available_memory(device: torch.device | str) -> float:
    """Bytes a new allocation on ``device`` can take now (``LOSSATLAS_MEMORY_LIMIT`` overrides).

    Else the operator's own measure (``lossatlas.curvature.base.available_memory``): free CUDA memory plus
    cached free blocks; ``MemAvailable`` or psutil's ``available`` on a CPU; infinity where unknown.
    """
    limit = os.environ.get(MEMORY_LIMIT_ENV)
    if limit:
        return float(parse_bytes(limit))
    return base_available_memory(torch.device(device))


def disk_free() -> float:
    """Free bytes under ``tempfile.gettempdir()`` ($TMPDIR), where a disk basis is mapped."""
    try:
        return float(shutil.disk_usage(tempfile.gettempdir()).free)
    except OSError:
        return math.inf


def compute_dtype(requested: torch.dtype | None, model: torch.nn.Module) -> torch.dtype | None:
    """The dtype curvature products run in: float32 for a float16/bfloat16 model or request, else ``requested``.

    Half precision keeps 8 (bf16) or 11 (fp16) significant bits: a Hessian-vector product in it loses the
    small eigenvalues and Lanczos loses orthogonality after a few steps, so a half-precision checkpoint
    is analysed on float32 copies (the default; ``dtype="float64"`` still asks for more).
    """
    if requested is not None:
        return torch.float32 if requested in HALF_DTYPES else requested
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    return torch.float32 if first is not None and first.dtype in HALF_DTYPES else None


def fmt_bytes(n: float) -> str:
    """Three significant digits and a decimal unit (``1.23 GB``), ``inf`` for an unknown amount.

    >>> fmt_bytes(1.234e9), fmt_bytes(5e5), fmt_bytes(float("inf"))
    ('1.23 GB', '500 kB', 'inf')
    """
    if not math.isfinite(n):
        return "inf"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


# ---- what a run will do -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LanczosWork:
    """One Lanczos phase: R runs of block size b for at most ``steps`` block steps, keeping k Ritz vectors."""

    runs: int = 1
    block: int = 1
    steps: int = 100
    ritz_vectors: int = 0

    def products(self) -> int:
        """The most products the phase may take: runs × block × steps."""
        return self.runs * self.block * self.steps


@dataclass(frozen=True)
class TraceWork:
    """A trace phase: ``method`` ("auto", "xtrace", "hutchpp", "hutchinson") with ``matvecs`` products."""

    method: str = "auto"
    matvecs: int = 96


def default_max_iter(k: int, block: int, num_params: int) -> int:
    """``lanczos_eigs``'s default number of block steps: max(20, ⌈max(100, 10k)/b⌉), at most ⌊P/b⌋."""
    return min(num_params // block, max(20, math.ceil(max(100, 10 * k) / block)))


# ---- the plan ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryPlan:
    """The peak memory a run will need, by part, against what is available.

    ``parts`` are bytes on the operator's device (``state``, ``graphs``, ``basis``, ``workspace``);
    ``host_basis`` the basis bytes in host memory when it lives there apart from a GPU operator,
    ``disk_basis`` those in a file. ``available`` / ``host_available`` / ``disk_available`` are what
    the device, the host and $TMPDIR can take.
    """

    products: int
    num_params: int
    dtype: str
    basis_shape: tuple[int, int]  # (runs × rows, the largest basis) in P-vectors
    basis_device: str  # "device" (the operator's), "cpu" or "disk"
    device: str
    parts: dict[str, int]
    available: float
    host_basis: int = 0
    host_available: float = math.inf
    disk_basis: int = 0
    disk_available: float = math.inf
    path: str = "auto"
    options: tuple[str, ...] = field(default=())  # what would fit when this does not
    graph_cache_bytes: int = 0  # the operator's budget for kept graphs this plan assumes
    lean: bool = False  # whether the plan lowered that budget to fit (graphs rebuilt per product)

    @property
    def peak(self) -> int:
        """Estimated peak bytes on the operator's device."""
        return int(sum(self.parts.values()))

    @property
    def fits(self) -> bool:
        """Whether the device, the host (a host basis) and the disk (a disk basis) can hold it."""
        host_extra = self.host_basis if self.device != "cpu" else 0
        return (self.peak <= self.available and host_extra <= self.host_available
                and self.disk_basis <= self.disk_available)

    def as_meta(self) -> dict[str, Any]:
        """JSON-able numbers for a result's metadata (bytes; ``available`` None where unknown)."""
        def num(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        return {"products": self.products, "peak_bytes": self.peak, "parts": dict(self.parts),
                "basis_rows": self.basis_shape[0], "basis_device": self.basis_device, "host_basis_bytes": self.host_basis,
                "disk_basis_bytes": self.disk_basis, "available_bytes": num(self.available), "path": self.path,
                "graph_cache_bytes": self.graph_cache_bytes, "lean": self.lean}

    def line(self) -> str:
        """One line: ``plan: ~40 products, basis 1×40×P float32 = 1.2 GB (cpu), peak ≈ 3.4 GB of 24 GB available``."""
        rows, P = self.basis_shape
        nbytes = self.parts.get("basis", 0) or self.host_basis or self.disk_basis
        where = "" if self.basis_device == "device" else f" on {self.basis_device}"
        return (f"plan: ~{self.products} products, P={P:,} parameters, basis {rows}×P {self.dtype} = "
                f"{fmt_bytes(nbytes)}{where}, peak ≈ {fmt_bytes(self.peak)} of {fmt_bytes(self.available)} "
                f"available on {self.device} (state {fmt_bytes(self.parts['state'])}, graphs "
                f"{fmt_bytes(self.parts['graphs'])}{' (lean: the rest rebuilt per product)' if self.lean else ''}, "
                f"basis+workspace {fmt_bytes(self.parts['basis'] + self.parts['workspace'])})")

    def refusal(self, what: str) -> str:
        """The one-line refusal: the numbers, and the options that would fit."""
        where = f"{fmt_bytes(self.peak)} on {self.device} with {fmt_bytes(self.available)} available"
        if self.device != "cpu" and self.host_basis > self.host_available:
            where += f", basis {fmt_bytes(self.host_basis)} in host memory with {fmt_bytes(self.host_available)}"
        if self.disk_basis > self.disk_available:
            where += f", basis {fmt_bytes(self.disk_basis)} on disk with {fmt_bytes(self.disk_available)} free"
        fix = ("use " + " or ".join(self.options) if self.options else
               "no option fits (basis elsewhere, finite differences, fewer examples): use a machine with more memory")
        return f"{what}: not enough memory: the plan needs {where}; {fix} ({MEMORY_LIMIT_ENV} overrides the limit)"


class Planner:
    """Measures what an operator's products hold, then plans runs on it (``plan``).

    Args:
        op: a ``lossatlas.curvature.CurvatureOperator`` (set up here: its copies count as ``state``).
        model: the user's module the operator was built from (its storages are not new).
        data: the batches given to the operator (their storages are not new).
        available: bytes available on the operator's device (default: measured before the set-up).
    """

    def __init__(self, op: Any, model: torch.nn.Module, data: Sequence[Any], available: float | None = None) -> None:
        self.op = op
        self.device = torch.device(op.device)
        self.available = available_memory(self.device) if available is None else float(available)
        self.host_available = available_memory("cpu") if self.device.type != "cpu" else self.available
        self.disk_available = disk_free()
        given = _storages([*model.parameters(), *model.buffers()], data)
        st = op._ready()
        self.P = int(op.num_params)
        self.itemsize = torch.empty(0, dtype=op.dtype).element_size()
        mine = [*st["point"].values(), *st["fixed"].values(), *(b for b in st["buffers"].values() if b is not None)]
        self.state = sum(n for ptr, n in _storages(mine, st["batches"]).items() if ptr not in given)
        self.sizes = [batch_length(x) for x, _ in st["batches"]]
        self._fits: dict[bool, tuple[float, float]] = {}

    # -- the measurement -------------------------------------------------------------------------------
    def activations(self, n: int, create_graph: bool = True) -> float:
        """Saved-tensor bytes of one gradient over a batch of n examples (linear in n, measured on two slices)."""
        if create_graph not in self._fits:
            self._fits[create_graph] = self._measure(create_graph)
        a, c = self._fits[create_graph]
        return max(0.0, a + c * n)

    def _measure(self, create_graph: bool) -> tuple[float, float]:
        """(intercept, bytes per example) of the saved tensors on slices of n₁ < n₂ examples of the largest batch."""
        st = self.op._ready()
        if not st["batches"]:
            return 0.0, 0.0
        b = max(range(len(self.sizes)), key=lambda i: self.sizes[i])
        x, y = st["batches"][b]
        n2 = min(self.sizes[b], _SLICE)
        n1 = max(1, n2 // 2)
        counts = [self._saved(x, y, n, create_graph) for n in sorted({n1, n2})]
        if len(counts) == 1:
            return 0.0, counts[0] / n2
        slope = max(0.0, (counts[1] - counts[0]) / (n2 - n1))
        return counts[0] - slope * n1, slope

    def _saved(self, x: Any, y: Tensor, n: int, create_graph: bool) -> int:
        """Bytes autograd saves for one gradient of the loss over the first n examples (new storages only)."""
        op = self.op
        st = op._ready()
        known = set(_storages([*st["point"].values(), *st["fixed"].values(),
                               *(t for t in st["buffers"].values() if t is not None)], st["batches"]))
        seen: set[int] = set()
        total = [0]

        def pack(t: Tensor) -> Tensor:
            try:
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
            except (RuntimeError, NotImplementedError):  # a tensor without storage (functorch wrapper)
                key, nbytes = id(t), t.numel() * t.element_size()
            if key not in seen and key not in known:
                seen.add(key)
                total[0] += nbytes
            return t

        xs, ys = map_inputs(lambda t: t[:n], x), y[:n]
        leaves = op._leaves()
        with op._modes(), sdpa_kernel(SDPBackend.MATH), torch.random.fork_rng(devices=[]):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = op._batch_loss(leaves, xs, ys)
                grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=create_graph, allow_unused=True)
        del grads, loss
        return total[0]

    # -- the plan --------------------------------------------------------------------------------------
    def plan(self, lanczos: Sequence[LanczosWork] = (), trace: TraceWork | None = None, *,
             basis_device: str | None = None, path: str | None = None, max_examples: int | None = None,
             offer: Sequence[str] = ("basis_device", "finite_difference", "max_examples")) -> MemoryPlan:
        """The plan of Lanczos phases and a trace phase, run one after the other on this operator.

        ``path`` (default: the operator's requested path) and ``max_examples`` (the first examples only)
        plan a variant without building it; ``options`` lists the variants among ``offer`` that fit when
        this does not.

        Lean mode: when the plan with the operator's kept graphs does not fit and its ``graph_cache`` is
        ``"auto"``, the largest graph budget that fits (graphs are kept in batch order, so a prefix of
        them; 0: every graph rebuilt per product) is set as the operator's ``graph_cache_bytes`` and that
        plan is returned (``plan.lean``). The products are bit-identical; each costs one gradient's
        forward and ``create_graph`` backward more. Finite differences (approximate) are only offered.
        """
        path = path or self.op.requested_path
        plan = self._plan(lanczos, trace, basis_device, path, max_examples)
        if plan.fits:
            return plan
        if getattr(self.op, "graph_cache", "on") == "auto" and plan.parts["graphs"] > 0:
            for budget in self._lean_budgets(max_examples):
                lean = self._plan(lanczos, trace, basis_device, path, max_examples, budget)
                if lean.fits:
                    self.op.graph_cache_bytes = int(budget)  # the operator keeps only the graphs that fit
                    return replace(lean, lean=True)
        return replace(plan, options=self._options(lanczos, trace, basis_device, plan.path, offer))

    def _lean_budgets(self, max_examples: int | None) -> list[float]:
        """Graph budgets below the operator's, largest first: each prefix of the batches' graphs, then 0."""
        acts = [self.activations(n) for n in _truncate(self.sizes, max_examples)]
        prefix = [sum(acts[:i]) for i in range(len(acts), -1, -1)]
        return [b for b in prefix if b < self.op.graph_cache_bytes] or [0.0]

    def _plan(self, lanczos, trace, basis_device, path, max_examples, cache: float | None = None) -> MemoryPlan:
        cache = self.op.graph_cache_bytes if cache is None else cache
        P, s = self.P, self.itemsize
        sizes = _truncate(self.sizes, max_examples)
        fd = path == "finite_difference"
        acts = [self.activations(n, create_graph=not fd) for n in sizes]
        act_max = max(acts, default=0.0)
        if fd:  # no graph is kept; each product holds one gradient's graph, two gradients and the shifted point
            held, extra_graph = 0.0, 0.0
        else:
            held, extra_graph = _cached(acts, P * s, cache)

        def product(K: int) -> float:  # one A @ (P, K)'s transient bytes beside the kept graphs
            if fd:
                return 2 * act_max + (K + 4) * P * s
            if path == "forward_over_reverse":  # vmapped: every vector's forward and backward at once
                chunk = self.op.chunk_size or K
                return 3 * act_max * min(K, chunk) + (2 * K + 1) * P * s
            return extra_graph + act_max + (K + 1) * P * s + (K * P * s if K > 1 else 0)

        on = basis_device or "device"
        resident_basis = on == "device" or (on == "cpu" and self.device.type == "cpu")
        phases: list[tuple[float, float]] = []  # (basis bytes resident on the device, workspace bytes)
        kept = 0.0  # Ritz vectors of earlier phases still alive (the probe keeps the top eigenvectors)
        largest, rows_largest, host_basis, disk_basis = 0.0, 0, 0.0, 0.0
        products = 0
        for work in lanczos:
            products += work.products()
            rows_final, rows_grow = _basis_rows(work.block, work.steps, P)
            final = work.runs * rows_final * P * s
            growing = work.runs * rows_grow * P * s  # old and new arrays together while it grows
            if on == "disk":
                disk_basis = max(disk_basis, work.runs * min(work.steps * work.block, P) * P * s)
            elif not resident_basis:
                host_basis = max(host_basis, max(final, growing))
            if work.runs * rows_final > rows_largest:
                rows_largest = work.runs * rows_final
            K = work.runs * work.block
            step_ws = (6 * K if K > 1 else 3) * P * s + min(work.runs * rows_final * P * 8, _GRAM_CHUNK)
            ritz = 2 * work.ritz_vectors * P * s
            base = final if resident_basis else 0.0
            grow = growing if resident_basis else 0.0
            ws = max(product(K), step_ws, ritz)
            phases.append((base, kept + max(ws, grow - base)))
            largest = max(largest, base)
            kept += work.ritz_vectors * P * s
        if trace is not None:
            products += trace.matvecs
            m = max(1, trace.matvecs // 2)
            if trace.method in ("auto", "xtrace"):
                ws = 4 * m * P * s + 2 * m * P * 8 + product(m)
            elif trace.method == "hutchpp":
                ws = 5 * (trace.matvecs // 3) * P * s + product(trace.matvecs // 3)
            else:
                ws = 2 * min(16, trace.matvecs) * P * s + product(min(16, trace.matvecs))
            phases.append((0.0, kept + ws))
        basis_now, ws_now = max(phases, key=lambda bw: bw[0] + bw[1], default=(0.0, product(1)))
        parts = {"state": int(self.state), "graphs": int(held), "basis": int(basis_now), "workspace": int(ws_now)}
        return MemoryPlan(products=products, num_params=P, dtype=str(self.op.dtype).replace("torch.", ""),
                          basis_shape=(rows_largest, P), basis_device=on, device=str(self.device), parts=parts,
                          available=self.available, host_basis=int(host_basis), host_available=self.host_available,
                          disk_basis=int(disk_basis), disk_available=self.disk_available, path=path,
                          graph_cache_bytes=0 if fd else int(cache))

    def _options(self, lanczos, trace, basis_device, path, offer) -> tuple[str, ...]:
        """The variants among ``offer`` that fit: a basis elsewhere, finite differences, fewer examples."""
        out = []
        for where in BASIS_DEVICES if "basis_device" in offer else ():
            if where != basis_device and lanczos and self._plan(lanczos, trace, where, path, None).fits:
                out.append(f"--basis-device {where}")
                break
        if path != "finite_difference" and getattr(self.op, "graph_cache", "auto") == "on":
            if self._plan(lanczos, trace, basis_device, path, None, 0).fits:
                out.append("--graph-cache off (gradient graphs rebuilt per product: the same numbers, slower)")
        if "finite_difference" in offer and path != "finite_difference" and self.op.kind == "hessian":
            fd = self._plan(lanczos, trace, basis_device, "finite_difference", None)
            if fd.fits:
                out.append("--path finite_difference (approximate products, one gradient's memory)")
        total = sum(self.sizes) if "max_examples" in offer else 0
        lo, hi = 0, total  # the most examples that fit, by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._plan(lanczos, trace, basis_device, path, mid).fits:
                lo = mid
            else:
                hi = mid - 1
        if 0 < lo < total:
            out.append(f"--max-examples {lo}")
        return tuple(out)


LONG_WORK = 10**10  # products × parameters above which the plan is printed off a terminal (minutes of CPU work)


def check_plan(plan: MemoryPlan, what: str, *, quiet: bool = False, dist: Any = None) -> MemoryPlan:
    """Refuse a plan that does not fit; print one that does.

    A plan that does not fit raises ``UserError`` (one line: the numbers and the options that fit);
    one that fits prints ``lossatlas: plan.line()`` on stderr when the work is long (stderr a
    terminal, or at least ``LONG_WORK`` products × parameters) and not ``quiet``/``--quiet``: short
    work stays silent, so a refused command still prints its one error line only. Under torchrun
    (an active ``dist``) every rank refuses when any rank's plan does not fit (the first such rank's
    line), so that no rank waits in a collective for one that stopped.
    """
    if dist is not None and dist.active:
        lines = dist.gather(None if plan.fits else f"rank {dist.rank}: {plan.refusal(what)}")
        refused = dist.broadcast(next((x for x in lines if x), None) if lines is not None else None)
        if refused:
            raise UserError(refused)
    elif not plan.fits:
        raise UserError(plan.refusal(what))
    from lossatlas import progress

    long = sys.stderr.isatty() or plan.products * plan.num_params >= LONG_WORK
    if long and not quiet and not progress._QUIET and os.environ.get("RANK", "0") == "0":
        print(f"lossatlas: {plan.line()}", file=sys.stderr, flush=True)
    return plan


# ---- helpers --------------------------------------------------------------------------------------------
def _storages(tensors: Sequence[Tensor], batches: Sequence[Any] = ()) -> dict[int, int]:
    """{storage pointer: bytes} of the tensors and of every tensor in the batches."""
    out: dict[int, int] = {}

    def add(t: Any) -> Any:
        if isinstance(t, Tensor):
            with contextlib.suppress(RuntimeError, NotImplementedError):
                storage = t.untyped_storage()
                out[storage.data_ptr()] = storage.nbytes()
        return t

    for t in tensors:
        add(t)
    for batch in batches:
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            map_inputs(add, batch[0])
            add(batch[1])
    return out


def _truncate(sizes: Sequence[int], max_examples: int | None) -> list[int]:
    """The batch sizes holding the first ``max_examples`` examples."""
    if max_examples is None:
        return list(sizes)
    out, left = [], int(max_examples)
    for n in sizes:
        if left <= 0:
            break
        out.append(min(n, left))
        left -= n
    return out


def _cached(acts: Sequence[float], grad_bytes: float, budget: int) -> tuple[float, float]:
    """(bytes of the graphs kept across products, bytes of the largest graph rebuilt per product).

    As ``CurvatureOperator``: graphs are kept in batch order while their saved tensors total at most
    ``budget``; from the first that does not fit on, none is kept. Each kept graph also holds its P
    gradient values.
    """
    held, counted, hit, rebuilt = 0.0, 0.0, False, 0.0
    for a in acts:
        if not hit and counted + a <= budget:
            counted += a
            held += a + grad_bytes
        else:
            hit = True
            rebuilt = max(rebuilt, a + grad_bytes)
    return held, rebuilt


def _basis_rows(block: int, steps: int, P: int) -> tuple[int, int]:
    """(rows of the final basis array, most rows alive at once while it grows by doubling)."""
    cap = min(steps * block, P)
    rows = min(cap, max(2 * block, _INITIAL_ROWS))
    most = rows
    while rows < cap and rows < steps * block:
        new = min(cap, 2 * rows)
        most = max(most, rows + new)
        rows = new
    return rows, most


__all__ = ["MemoryPlan", "Planner", "LanczosWork", "TraceWork", "check_plan", "available_memory", "compute_dtype",
           "parse_bytes", "fmt_bytes", "default_max_iter", "MEMORY_LIMIT_ENV", "BASIS_DEVICES"]
