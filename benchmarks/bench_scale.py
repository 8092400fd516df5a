"""Real-size benchmarks, side by side in one run: GPT-2 small (124M) and ResNet-18 (11M) on the CPU, float32.

The models (random initialization, eval mode, seed 0; ``transformers``, since torchvision is not installed):

- ``gpt2``: ``GPT2Config()`` defaults (12 layers, width 768, vocabulary 50257: 124M parameters), eager
  attention, 8 random token sequences of 128 tokens (next-token cross-entropy over all 8·128 positions);
- ``resnet18``: ``ResNetConfig(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic",
  embedding_size=64)`` + ``ResNetForImageClassification`` with 10 labels (11.2M parameters), 256 random
  3×32×32 images with random labels, one batch.

Every model is wrapped in a module that returns the logits as one (examples, classes) tensor, so that all
methods (ours, PyHessian, curvlinops) see the same function and ``nn.CrossEntropyLoss()``.

Measured (every method in its own subprocess, so that its peak resident memory is its own; the jobs run in
interleaved rounds — every method once per round — and the table gives the median over rounds):

1. **One product in gradients**: time of one Hessian-vector product over time of one gradient on the same
   data, measured back to back (``auto`` path, one vector and 8 vectors per call; double backward; PyHessian's
   ``hessian_vector_product``). Floors: ≤ 2.0 for one vector, ≤ 1.5 per vector for 8.
2. **Top-1 and top-5 to 1e-3**: ``lanczos_eigs(op, k, tol=1e-3)`` (the default ``residual`` criterion, and
   ``criterion="eigenvalue"``) beside PyHessian (``hessian(model, criterion, dataloader=...).eigenvalues``,
   its defaults: power iteration, tol 1e-3, 100 iterations) and curvlinops (``HessianLinearOperator`` +
   ``scipy.sparse.linalg.eigsh(which="LA", tol=1e-3)``): time, products, the true relative error.
   "True" is a long run of ours to a residual tolerance of ``--ref-tol`` (default 1e-5; float32 products
   cannot certify much below ~16·ε·λ₁/λ₅) whose Ritz values are recorded at every step (α_j = q_jᵀAq_j and
   β_j = q_{j+1}ᵀAq_j of the Krylov vectors the run multiplies, by a wrapper around the operator); its
   first steps are the tol-1e-3 run's steps (the same start vector, seed 0), so the step after which the
   top-k are truly within 1e-3 is known, and our stopping rule must end within 1.3× of it.
3. **Peak memory**: the resident-set high-water mark of each method's subprocess (sampled every 5 ms from
   ``/proc/self/status``, so that resets of the mark by the operator's own memory probe do not hide a peak)
   minus the mark after building the model and data, against the same for one gradient. Floor for ours:
   ≤ one gradient's peak + the Lanczos basis (products × P × 4 bytes).
4. **A 21×21 surface**: the ``surface`` probe (random filter-normalized directions, quadratic check on) vs a
   naive loop that writes θ* + αd₁ + βd₂ into the model in place and runs a forward pass at every point (loss
   only), one after the other in one process; both in forwards per grid point (total time / (441 × one
   full-data forward measured just before)). The probe uses the first-layer trick of
   ``lossatlas.probes.grid`` (the first layer's output is affine in its weights: W·x, d₁·x, d₂·x computed once
   for the whole grid); its last row gives the trick's reach: the share of one forward spent in that layer.

``--quick`` runs small versions of both models (the table says which) so that the whole run takes minutes on
a 2-core machine; the brief's ``n_layer=2`` GPT-2 and ``depths=[1, 1, 1, 1]`` ResNet still cost 8–15 s and
3–5 s per gradient here, too slow for minutes. ``--gpt2 n_layer=2,n_embd=768`` and ``--resnet18 ...`` override
any config field. The script prints the expected time of the full-size run, scaled from this run by the
forward FLOPs of each configuration (counted on the meta device, nothing allocated).

Run: ``python benchmarks/bench_scale.py [--quick] [--models gpt2,resnet18] [--repeats 3] [--threads 2] [--device cuda]``
(prints the table, writes benchmarks/results/bench_scale.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).parent
ROOT = HERE.parent
GRID = 21  # points per surface axis
DEVICE = torch.device("cpu")  # where a job's model, data and vectors live (--device; set per job)
TOL = 1e-3  # the accuracy asked of every eigenvalue method
FLOOR_HVP, FLOOR_HVP8, FLOOR_STOP = 2.0, 1.5, 1.3

FULL = {
    "gpt2": dict(config={}, sequences=8, tokens=128),
    "resnet18": dict(config=dict(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], embedding_size=64),
                     images=256),
}
QUICK = {
    "gpt2": dict(config=dict(n_layer=2, n_embd=128, n_head=4, vocab_size=2048, n_positions=128), sequences=4,
                 tokens=64),
    "resnet18": dict(config=dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128], embedding_size=16),
                     images=32),
}


# ------------------------------------------------------------------------------------------------ models
class Logits(nn.Module):
    """A Hugging Face model as a function of a tensor returning its logits (PyHessian needs a tensor)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).logits  # (B, T, V) for GPT-2, (B, C) for the ResNet


class FlatCE(nn.Module):
    """Mean cross-entropy over every position: (B, T, V) logits with (B, T) targets, or (B, C) with (B,).

    What ``lossatlas.losses`` "cross_entropy" computes, as a module for PyHessian and curvlinops.
    """

    reduction = "mean"  # curvlinops reads it to scale batches

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def build(name: str, spec: dict, *, meta: bool = False) -> tuple[nn.Module, list]:
    """The wrapped model (seed 0, eval mode) and its data as one batch [(inputs, flat targets)]."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if name == "gpt2":
        cfg = transformers.GPT2Config(**spec["config"])
        cfg._attn_implementation = "eager"  # the same attention code for every method
        with torch.device("meta" if meta else "cpu"):
            inner = transformers.GPT2LMHeadModel(cfg)
        gen = torch.Generator().manual_seed(1)
        seq = torch.randint(0, cfg.vocab_size, (spec["sequences"], spec["tokens"] + 1), generator=gen)
        x, y = seq[:, :-1], seq[:, 1:]  # next-token targets (B, T)
    elif name == "resnet18":
        cfg = transformers.ResNetConfig(layer_type="basic", num_labels=10, **spec["config"])
        with torch.device("meta" if meta else "cpu"):
            inner = transformers.ResNetForImageClassification(cfg)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(spec["images"], 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (spec["images"],), generator=gen)
    else:
        raise SystemExit(f"unknown model {name!r}; use gpt2 or resnet18")
    model = Logits(inner).eval()
    if meta:
        return model, [(x.to("meta"), y)]
    return model.to(DEVICE), [(x.to(DEVICE), y.to(DEVICE))]


def forward_flops(name: str, spec: dict) -> float:
    """FLOPs of one forward pass over the data, counted on the meta device (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, [(x, _)] = build(name, spec, meta=True)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return float(fc.get_total_flops())


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ memory
class PeakRSS:
    """The resident-set high-water mark of this process over a block, minus its mark at the start (bytes).

    Samples VmHWM and VmRSS every 5 ms in a thread: HessianOperator resets the kernel's mark
    (/proc/self/clear_refs) for its own memory probe, which would hide an earlier peak from ru_maxrss.
    """

    def __init__(self) -> None:
        self.base = self.peak = _status_kb("VmHWM")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _status_kb("VmHWM"), _status_kb("VmRSS"))

    def __enter__(self) -> PeakRSS:
        if DEVICE.type == "cuda":  # the allocator's own high-water mark over the block
            torch.cuda.synchronize(DEVICE)
            self.base = torch.cuda.memory_allocated(DEVICE) // 1024
            torch.cuda.reset_peak_memory_stats(DEVICE)
            return self
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)
            self.peak = torch.cuda.max_memory_allocated(DEVICE) // 1024
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kb("VmHWM"), _status_kb("VmRSS"))

    @property
    def extra(self) -> int:
        return int(max(0, self.peak - self.base) * 1024)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


# ------------------------------------------------------------------------------------------------ jobs
def gradient(model: nn.Module, batches) -> None:
    """One plain gradient of the mean cross-entropy (the cost unit)."""
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = batches[0]
    torch.autograd.grad(FlatCE()(model(x), y), params)


def warm_imports() -> None:
    """Pay, before anything is timed or measured, a process's one-off costs: the imports of its first double
    backward (sympy, ~1 s) and torch.func transform (torch._dynamo, 2.5–4.5 s, ~100 MB), the peers' imports and
    our first operator use (on a tiny model) — the same for every method, and no cost of the model's size."""
    w = torch.ones(2, requires_grad=True)
    (g,) = torch.autograd.grad((w**3).sum(), w, create_graph=True)
    torch.autograd.grad(g.sum(), w)
    torch.func.jvp(torch.func.grad(lambda u: (u**3).sum()), (torch.ones(2),), (torch.ones(2),))  # forward-over-reverse
    import curvlinops  # noqa: F401  (the peers' imports too, so no method pays a one-off the others skip)
    import pyhessian  # noqa: F401
    import scipy.sparse.linalg  # noqa: F401

    from lossatlas.curvature import HessianOperator
    from lossatlas.estimators import lanczos_eigs

    tiny = nn.Linear(3, 2).to(DEVICE)  # our first operator use in a process (lazy imports, path probing), tiny
    tiny_data = [(torch.randn(4, 3, device=DEVICE), torch.tensor([0, 1, 0, 1], device=DEVICE))]
    lanczos_eigs(HessianOperator(tiny, tiny_data, "cross_entropy"), 1,
                 return_eigenvectors=False)


def sync() -> None:
    """Wait for the device's queued kernels (a no-op on the CPU), so that a timer reads finished work."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


class Recorder:
    """Wraps a symmetric operator; records α_j = q_jᵀAq_j and β_j = q_{j+1}ᵀAq_j of single-vector Lanczos.

    The Ritz values after m steps are the eigenvalues of tridiag(β[:m-1], α[:m], β[:m-1]) (T_m = Q_mᵀAQ_m with
    a fully reorthogonalized basis); only the previous product is kept (one vector of memory).
    """

    def __init__(self, op) -> None:
        self.op, self.shape, self.dtype, self.device = op, op.shape, op.dtype, op.device
        self.alpha: list[float] = []
        self.beta: list[float] = []
        self._prev: torch.Tensor | None = None

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        out = self.op @ v
        q, w = v.reshape(-1).double(), out.reshape(-1).double()
        if self._prev is not None:
            self.beta.append(float(q @ self._prev))
        self.alpha.append(float(q @ w))
        self._prev = w
        return out

    def ritz(self, m: int, k: int) -> np.ndarray:
        from scipy.linalg import eigvalsh_tridiagonal

        vals = eigvalsh_tridiagonal(np.array(self.alpha[:m]), np.array(self.beta[: m - 1]))
        return np.sort(vals)[::-1][:k]


def job(args: dict) -> dict:
    """One measurement in this (fresh) process; returns a JSON-able dict."""
    from lossatlas.curvature import HessianOperator
    from lossatlas.estimators import lanczos_eigs

    global DEVICE
    torch.set_num_threads(args["threads"])
    DEVICE = torch.device(args.get("device", "cpu"))
    model, batches = build(args["model"], args["spec"])
    P = n_params(model)
    what = args["what"]
    out: dict[str, Any] = dict(P=P)
    warm_imports()
    with torch.no_grad():  # warm-up on one example (thread pools, lazy imports), leaving the memory mark low
        model(batches[0][0][:1])
    if what == "grad":
        with PeakRSS() as mem:
            first = timed(lambda: gradient(model, batches))
        out["peak"] = mem.extra
        out["time"] = statistics.median([first] + [timed(lambda: gradient(model, batches)) for _ in range(2)])
        return out
    if what == "hvp":
        return {**out, **hvp_ratios(model, batches, P, args["hvp_repeats"])}
    if what.startswith("surface"):
        return {**out, **surface(model, batches, what)}
    k = args["k"]
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if what in ("ours", "ours_eigenvalue", "ours_double_backward", "reference"):
            op = HessianOperator(model, batches, "cross_entropy",
                                 path="double_backward" if what == "ours_double_backward" else "auto")
            rec = Recorder(op) if what == "reference" else op
            crit = "eigenvalue" if what == "ours_eigenvalue" else "residual"
            tol = args["ref_tol"] if what == "reference" else TOL
            res = lanczos_eigs(rec, k, tol=tol, criterion=crit, return_eigenvectors=False,
                               max_iter=args["ref_steps"] if what == "reference" else None,
                               basis_device=basis_device(args.get("basis"), P, args["ref_steps"]))
            vals, products = res.eigenvalues, res.matvecs
            out["path"] = _path(op)
            if what == "reference":
                out["history"] = [rec.ritz(m, k).tolist() for m in range(1, len(rec.alpha) + 1)]
                out["residuals"] = (np.asarray(res.residuals) / np.abs(res.eigenvalues)).tolist()
        elif what == "pyhessian":
            vals, products = pyhessian_top(model, batches, k)
        elif what == "curvlinops":
            vals, products = curvlinops_top(model, batches, k)
        else:
            raise SystemExit(f"unknown job {what!r}")
        out["time"] = time.perf_counter() - t0
    out.update(peak=mem.extra, eigenvalues=np.asarray(vals, dtype=float).tolist(), products=int(products))
    return out


def basis_device(choice: str | None, P: int, steps: int) -> str | None:
    """``lanczos_eigs``'s basis_device under "auto": on a GPU, "cpu" when ``steps`` float32 vectors of length P would
    take more than half of its memory; on the CPU, "disk" when they would take more than half of this machine's
    memory (GPT-2 small: 150 × 0.5 GB); else the operator's device."""
    if choice != "auto":
        return choice
    need = steps * P * 4
    if DEVICE.type == "cuda":
        return "cpu" if need > torch.cuda.get_device_properties(DEVICE).total_memory / 2 else None
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return "disk" if need > total / 2 else None


def hvp_ratios(model, batches, P: int, repeats: int) -> dict:
    """Median (product time / gradient time), each product timed right after a gradient (load cancels)."""
    import pyhessian  # noqa: F401  (its __init__ shadows the submodule with the class)

    from lossatlas.curvature import HessianOperator

    ph = sys.modules["pyhessian.hessian"]
    gen = torch.Generator().manual_seed(0)
    v1, v8 = (torch.randn(*shape, generator=gen).to(DEVICE) for shape in ((P,), (P, 8)))
    auto = HessianOperator(model, batches, "cross_entropy")
    db = HessianOperator(model, batches, "cross_entropy", path="double_backward")
    h = ph.hessian(model, FlatCE(), data=batches[0], cuda=DEVICE.type == "cuda")  # its graph built once, as its solver
    pv = [torch.randn_like(p) for p in h.params]
    cases = {
        "auto K=1": (lambda: auto @ v1, 1),
        "auto K=8": (lambda: auto @ v8, 8),
        "double_backward K=1": (lambda: db @ v1, 1),
        "double_backward K=8": (lambda: db @ v8, 8),
        "PyHessian K=1": (lambda: ph.hessian_vector_product(h.gradsH, h.params, pv), 1),
    }
    for fn, _ in cases.values():  # warm-up; lets `auto` time its paths on the first products of each bucket
        for _ in range(3):
            fn()
    ratios: dict[str, list[float]] = {c: [] for c in cases}
    grads = []
    for _ in range(repeats):
        for c, (fn, K) in cases.items():
            tg = timed(lambda: gradient(model, batches))
            grads.append(tg)
            ratios[c].append(timed(fn) / tg / K)
    model.zero_grad(set_to_none=True)  # PyHessian left a graph in .grad
    return dict(ratios={c: statistics.median(r) for c, r in ratios.items()}, time=statistics.median(grads),
                auto_path=_path(auto))


def _path(op) -> str:
    """The paths ``auto`` chose, by block-size bucket ("1: double_backward; 8: ..."), or the explicit path."""
    report = op.path_report() if hasattr(op, "path_report") else {}
    chosen = report.get("chosen") or {}
    return "; ".join(f"{b}: {p}" for b, p in chosen.items()) or str(op.path)


class _Count:
    n = 0


def pyhessian_top(model, batches, k: int):
    """PyHessian's defaults (power iteration with deflation, tol 1e-3, 100 iterations), data-loader mode."""
    import pyhessian  # noqa: F401

    ph = sys.modules["pyhessian.hessian"]
    orig = ph.hessian.dataloader_hv_product

    def counted(self, v):
        _Count.n += 1
        return orig(self, v)

    ph.hessian.dataloader_hv_product = counted
    torch.manual_seed(0)
    _Count.n = 0
    h = ph.hessian(model, FlatCE(), dataloader=batches, cuda=DEVICE.type == "cuda")
    vals, _ = h.eigenvalues(top_n=k)
    return np.asarray(vals), _Count.n


def curvlinops_top(model, batches, k: int):
    """curvlinops' HessianLinearOperator as a SciPy operator + eigsh(which="LA", tol=1e-3), seeded start."""
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    S = HessianLinearOperator(model, FlatCE(), params, batches).to_scipy()
    count = [0]

    def mv(v):
        count[0] += 1
        return S @ v

    L = LinearOperator(S.shape, matvec=mv, dtype=S.dtype)
    v0 = np.random.default_rng(0).standard_normal(S.shape[0]).astype(S.dtype)
    vals = eigsh(L, k=k, which="LA", tol=TOL, v0=v0, return_eigenvectors=False)
    return np.sort(vals)[::-1], count[0]


def surface(model, batches, what: str) -> dict:
    """Seconds for a GRID×GRID surface, and one full-data forward's seconds (the unit)."""
    from lossatlas.probes.base import ProbeContext
    from lossatlas.probes.directions import model_state, random_direction
    from lossatlas.probes.surface import Surface

    x, y = batches[0]

    def forward():
        with torch.no_grad():
            FlatCE()(model(x), y)

    def both(fn) -> tuple[float, float]:  # (wall, CPU) seconds: CPU time is what a loaded shared machine leaves intact
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    def unit() -> list[tuple[float, float]]:
        return [both(forward) for _ in range(5)]

    def per_point(fn) -> tuple[float, float]:
        """fn's (wall, CPU) time over GRID² forwards, the unit the median of 5 forwards just before and 5 just after
        (bracketing: on a shared machine the load drifts during a run)."""
        before = unit()
        wall, cpu = both(fn)
        runs = before + unit()
        return (wall / (GRID * GRID * statistics.median(r[0] for r in runs)),
                cpu / (GRID * GRID * statistics.median(r[1] for r in runs)))

    forward()
    t_fwd = statistics.median(r[0] for r in unit())
    out: dict[str, Any] = dict(forward=t_fwd)
    if what in ("surface", "surface_naive_first"):  # ours and the naive loop in one process, back to back, each
        # against a fresh forward unit; "surface_naive_first" swaps the order (the first grid in a process pays the
        # allocator's warm-up)
        probe = Surface(dims=2, xrange=(-1.0, 1.0, GRID))
        ctx = ProbeContext(model=model, data=batches, loss="cross_entropy")

        def naive():
            base = model_state(model, "weights")
            g = torch.Generator().manual_seed(0)
            d1, d2 = (random_direction(model, base, generator=g).tensors for _ in range(2))
            params = dict(model.named_parameters())
            saved = {n: p.detach().clone() for n, p in params.items()}
            with torch.no_grad():
                for b in np.linspace(-1, 1, GRID):
                    for a in np.linspace(-1, 1, GRID):
                        for n, p in params.items():  # θ* + a·d₁ + b·d₂, written in place
                            p.copy_(saved[n])
                            if n in d1:
                                p.add_(d1[n], alpha=float(a)).add_(d2[n], alpha=float(b))
                        FlatCE()(model(x), y)
                for n, p in params.items():
                    p.copy_(saved[n])
        for key in (("naive", "ours") if what == "surface_naive_first" else ("ours", "naive")):
            out[key], out[key + "_cpu"] = per_point(naive if key == "naive" else lambda: probe.run(ctx))
        out["time"] = (out["ours"] + out["naive"]) * GRID * GRID * t_fwd
    elif what == "surface_first_layer":
        out.update(first_layer_share(model, x, t_fwd))
    return out


def first_layer_share(model, x, t_fwd: float) -> dict:
    """The first parametrized layer that reads the model's input tensor itself, and its share of a forward."""
    seen: list[tuple[str, nn.Module, torch.Tensor]] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, inp, name=name: seen.append((name, mod, inp[0])) if inp and isinstance(inp[0], torch.Tensor)
                and inp[0].data_ptr() == x.data_ptr() and inp[0].shape == x.shape else None))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    if not seen:
        return dict(first_layer=None, share=0.0)
    name, mod, inp = seen[0]
    with torch.no_grad():
        mod(inp)
        t = statistics.median(timed(lambda: mod(inp)) for _ in range(5))
    return dict(first_layer=f"{name} ({type(mod).__name__})", share=t / t_fwd)


# ------------------------------------------------------------------------------------------------ driver
def run_job(spec: dict, threads: int) -> dict:
    """Run ``job(spec)`` in a fresh interpreter; its JSON answer is the last line of its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
        return dict(error=f"{spec['what']} failed: {tail}", wall=time.perf_counter() - t0)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall"] = time.perf_counter() - t0
    return res


def rel_err(vals, ref) -> float:
    vals = np.sort(np.asarray(vals, dtype=float))[::-1][: len(ref)]
    if len(vals) < len(ref):
        return float("nan")
    return float(np.max(np.abs(vals - ref) / np.abs(ref)))


def bench_surface_only(name: str, base: dict, args, log) -> list[str]:
    """``--only surface``: the surface jobs alone, in interleaved rounds (no eigenvalue reference run); the order of
    ours and the naive loop inside each round's process alternates between rounds."""
    rounds = []
    for r in range(args.repeats):  # odd rounds run the naive loop first in their process
        res = run_job({**base, "what": "surface_naive_first" if r % 2 else "surface", "k": 0}, args.threads)
        rounds.append(res)
        log(f"round {r + 1} ({'naive' if r % 2 else 'ours'} first): " + (res["error"] if "error" in res else
                                  f"ours {res['ours']:.3f}, naive {res['naive']:.3f} forwards/point; in CPU time ours "
                                  f"{res['ours_cpu']:.3f}, naive {res['naive_cpu']:.3f} (forward "
                                  f"{res['forward'] * 1e3:.1f} ms, wall {res['wall']:.1f}s, load {os.getloadavg()[0]:.1f})"))
    ok = [x for x in rounds if "ours" in x]
    rows = []
    for key, label in (("ours", "lossatlas surface probe (quadratic check on)"), ("naive", "naive in-place loop")):
        if not ok:
            rows.append(f"| {name} | surface {GRID}×{GRID} | {label} | {rounds[0].get('error')} | | | | | |")
            continue
        fpp, cpu = statistics.median(x[key] for x in ok), statistics.median(x[key + "_cpu"] for x in ok)
        each = ", ".join(f"{x[key]:.3f}" for x in ok)
        each_cpu = ", ".join(f"{x[key + '_cpu']:.3f}" for x in ok)
        t = fpp * GRID * GRID * statistics.median(x["forward"] for x in ok)
        rows.append(f"| {name} | surface {GRID}×{GRID} | {label} | {t:.2f} s | | | | | {fpp:.3f} forwards/point "
                    f"(rounds: {each}); in CPU time {cpu:.3f} (rounds: {each_cpu}) |")
    fl = run_job({**base, "what": "surface_first_layer", "k": 0}, args.threads)
    if "share" in fl:
        rows.append(f"| {name} | surface first-layer trick | potential: {fl['first_layer']} | | | | | | "
                    f"{fl['share']:.1%} of a forward → ≥ {1 - fl['share']:.3f} forwards/point |")
    return rows


def bench_model(name: str, spec: dict, args) -> tuple[list[str], dict]:
    base = dict(model=name, spec=spec, threads=args.threads, device=args.device, hvp_repeats=args.hvp_repeats,
                ref_tol=args.ref_tol, ref_steps=args.ref_steps, basis=args.basis)
    log = lambda s: print(f"  [{name}] {s}", file=sys.stderr, flush=True)  # noqa: E731
    if args.only == "surface":
        return bench_surface_only(name, base, args, log), {}
    ref = run_job({**base, "what": "reference", "k": 5}, args.threads)
    if "error" in ref:
        raise SystemExit(ref["error"])
    truth = np.asarray(ref["eigenvalues"])
    hist = ref["history"]  # Ritz values (≤ 5) after every step of the long run
    log(f"P={ref['P']:,}; reference top-5 {np.round(truth, 6).tolist()} after {ref['products']} products "
        f"(max residual/|θ| {max(ref['residuals']):.1e}), {ref['time']:.1f}s")
    truly = {}
    for k in (1, 5):  # the first step after which the top-k Ritz values stay within TOL of the truth
        ok = [len(h) >= k and rel_err(h[:k], truth[:k]) <= TOL for h in hist]
        bad = [i for i, o in enumerate(ok) if not o]
        truly[k] = (bad[-1] + 2) if bad else 1
    jobs = [dict(what="grad", k=0), dict(what="hvp", k=0)]
    for k in (1, 5):
        jobs += [dict(what="ours", k=k), dict(what="ours_eigenvalue", k=k), dict(what="curvlinops", k=k)]
        if k == 5:
            jobs.append(dict(what="ours_double_backward", k=k))
        if k == 1 or args.peers_top5:
            jobs.append(dict(what="pyhessian", k=k))
    if not args.no_surface:
        jobs += [dict(what="surface", k=0), dict(what="surface_first_layer", k=0)]
    results: dict[int, list[dict]] = {i: [] for i in range(len(jobs))}
    for r in range(args.repeats):  # interleaved rounds: every method once per round
        for i, j in enumerate(jobs):
            if r > 0 and j["what"] == "surface_first_layer":
                continue
            res = run_job({**base, **j}, args.threads)
            results[i].append(res)
            log(f"round {r + 1}: {j['what']} k={j['k']}: "
                + (res["error"] if "error" in res else f"{res.get('time', 0):.2f}s (wall {res['wall']:.1f}s)"))
    med = lambda i, key: statistics.median(x[key] for x in results[i] if key in x) if any(  # noqa: E731
        key in x for x in results[i]) else float("nan")
    first = lambda i: next((x for x in results[i] if "error" not in x), results[i][0])  # noqa: E731
    t_grad = med(0, "time")
    grad_peak = med(0, "peak")
    P = ref["P"]
    rows = [f"| {name} | gradient | P = {P:,} | {t_grad:.3f} s | 1.00 | | | {grad_peak / 2**20:.0f} MiB | |"]
    h = first(1)
    if "error" in h:
        rows.append(f"| {name} | HVP | {h['error']} | | | | | | |")
    else:
        rat = {c: statistics.median(x["ratios"][c] for x in results[1] if "ratios" in x) for c in h["ratios"]}
        for c, v in rat.items():
            floor = FLOOR_HVP8 if "K=8" in c else FLOOR_HVP
            path = f" [{h['auto_path']}]" if c.startswith("auto") else ""
            verdict = "" if c.startswith("PyHessian") else f"{'✓' if v <= floor else '✗'} ≤ {floor}"
            rows.append(f"| {name} | HVP {c}{path} | per vector | {v * t_grad:.3f} s | {v:.2f} | | | | {verdict} |")
    for i, j in enumerate(jobs):
        if j["what"] not in ("ours", "ours_eigenvalue", "ours_double_backward", "pyhessian", "curvlinops"):
            continue
        x = first(i)
        k = j["k"]
        label = {"ours": "lossatlas Lanczos (residual)", "ours_eigenvalue": "lossatlas Lanczos (eigenvalue)",
                 "ours_double_backward": "lossatlas Lanczos (residual, path=double_backward)",
                 "pyhessian": "PyHessian (defaults, data loader)", "curvlinops": "curvlinops + eigsh"}[j["what"]]
        if "error" in x:
            rows.append(f"| {name} | top-{k} | {label} | {x['error']} | | | | | |")
            continue
        t = med(i, "time")
        err = rel_err(x["eigenvalues"], truth[:k])
        peak = med(i, "peak")
        verdict = ""
        if j["what"].startswith("ours"):
            stop = x["products"] / truly[k]
            basis = x["products"] * P * 4
            within = "✓" if err <= TOL else "✗"
            verdict = (f"err {within}; stops at {stop:.2f}× the {truly[k]} products that suffice "
                       f"({'✓' if stop <= FLOOR_STOP else '✗'} ≤ {FLOOR_STOP}×); "
                       f"memory {'✓' if peak <= grad_peak + basis else '✗'} ≤ grad + basis "
                       f"({(grad_peak + basis) / 2**20:.0f} MiB)")
        rows.append(f"| {name} | top-{k} | {label} | {t:.2f} s | {t / t_grad:.1f} | {x['products']} | {err:.1e} | "
                    f"{peak / 2**20:.0f} MiB ({peak / grad_peak:.2f}×) | {verdict} |")
    if not args.no_surface:
        ix = {j["what"]: i for i, j in enumerate(jobs)}
        i = ix["surface"]
        ok = [x for x in results[i] if "ours" in x]
        for key, label in (("ours", "lossatlas surface probe (quadratic check on)"), ("naive", "naive in-place loop")):
            if not ok:
                rows.append(f"| {name} | surface {GRID}×{GRID} | {label} | {first(i).get('error')} | | | | | |")
                continue
            fpp = statistics.median(x[key] for x in ok)
            t = fpp * GRID * GRID * statistics.median(x["forward"] for x in ok)
            rows.append(f"| {name} | surface {GRID}×{GRID} | {label} | {t:.2f} s | | | | | {fpp:.3f} forwards/point |")
        fl = first(ix["surface_first_layer"])
        if "share" in fl:
            rows.append(f"| {name} | surface first-layer trick | potential: {fl['first_layer']} | | | | | | "
                        f"{fl['share']:.1%} of a forward → ≥ {1 - fl['share']:.3f} forwards/point |")
    units = sum(x.get("time", 0.0) for v in results.values() for x in v) / t_grad  # all timed work, in gradients
    # the same work counted in products (per-call overheads of small models left out), for the full-size estimate
    r1 = h["ratios"]["auto K=1"] if "ratios" in h else 2.0
    counted = ref["products"] * r1
    for i, j in enumerate(jobs):
        for x in results[i]:
            if "products" in x:
                counted += x["products"] * (r1 + (1.0 if j["what"] == "pyhessian" else 0.0))  # PyHessian rebuilds graphs
            elif j["what"] == "hvp" and "ratios" in x:
                counted += (3 + args.hvp_repeats) * (sum(v * (8 if "K=8" in c else 1) for c, v in x["ratios"].items()) + 5)
            elif j["what"] == "surface" and "ours" in x:
                counted += (x["ours"] + x["naive"]) * GRID * GRID * x["forward"] / t_grad
    wall = sum(x.get("wall", 0.0) for v in results.values() for x in v) + ref["wall"]
    summary = dict(P=P, t_grad=t_grad, units=units + ref["time"] / t_grad, counted=counted, wall=wall, truly=truly,
                   ref_products=ref["products"], truth=truth.tolist())
    return rows, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small versions of both models (minutes, not hours)")
    parser.add_argument("--models", default="gpt2,resnet18")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--hvp-repeats", type=int, default=5, help="back-to-back (gradient, product) pairs per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: every method's model, data and vectors there; "
                        "peak memory is then the CUDA allocator's high-water mark")
    parser.add_argument("--ref-tol", type=float, default=1e-5, help="residual tolerance of the long reference run")
    parser.add_argument("--ref-steps", type=int, default=150, help="most steps of the long reference run")
    parser.add_argument("--basis", default="auto",
                        help="lanczos basis_device: auto (disk when --ref-steps vectors exceed half the RAM), cpu, disk")
    parser.add_argument("--peers-top5", action="store_true", help="also PyHessian top-5 (power iteration, slow)")
    parser.add_argument("--no-surface", action="store_true")
    parser.add_argument("--only", choices=["surface"], help="run only these jobs (surface: no eigenvalue reference)")
    parser.add_argument("--gpt2", default="", help="GPT2Config overrides, e.g. n_layer=2,n_embd=768")
    parser.add_argument("--resnet18", default="", help="ResNetConfig overrides, e.g. depths=1:1:1:1")
    parser.add_argument("--out", default=None, help="the table's file (default results/bench_scale[_ONLY].md)")
    args = parser.parse_args()
    if args.out is None:  # --only writes beside the full table, never over it
        args.out = str(HERE / "results" / (f"bench_scale_{args.only}.md" if args.only else "bench_scale.md"))
    if args.job:
        print(json.dumps(job(json.loads(args.job))))
        return
    torch.set_num_threads(args.threads)
    presets = QUICK if args.quick else FULL
    lines = ["| model | measure | method | time | gradients | products | rel. error | peak memory (× gradient's) "
             "| verdict |", "|" + "---|" * 9]
    notes, expected, upper = [], 0.0, 0.0
    t_start = time.perf_counter()
    for name in args.models.split(","):
        spec = json.loads(json.dumps(presets[name]))
        for kv in filter(None, getattr(args, name).split(",")):  # KEY=VAL overrides of the config
            key, val = kv.split("=")
            spec["config"][key] = [int(v) for v in val.split(":")] if ":" in val else int(val)
        rows, s = bench_model(name, spec, args)
        lines += rows
        if not s:  # --only: no gradient unit, no full-size estimate
            continue
        scale = forward_flops(name, FULL[name]) / forward_flops(name, spec)
        expected += s["counted"] * s["t_grad"] * scale  # products-based (upper: s["units"] with overheads)
        upper += s["units"] * s["t_grad"] * scale
        notes.append(f"- {name}: {s['P']:,} parameters, config {json.dumps(spec)}; a gradient {s['t_grad']:.3f} s; "
                     f"reference {s['ref_products']} products, top-1/top-5 truly within {TOL:g} after "
                     f"{s['truly'][1]}/{s['truly'][5]} products; this model's jobs: {s['wall']:.0f} s wall, "
                     f"{s['units']:.0f} gradient-equivalents timed ({s['counted']:.0f} counted in products); full size "
                     f"has {scale:.0f}× the forward FLOPs.")
    table = "\n".join(lines)
    kind = "QUICK (small configurations; provisional)" if args.quick else "full size"
    where = (f"{torch.cuda.get_device_name(args.device)}" if args.device.startswith("cuda")
             else f"CPU, {args.threads} threads")
    head = (f"# bench_scale — {kind}\n\n{where}, float32, torch {torch.__version__}, "
            f"median of {args.repeats} interleaved rounds, one subprocess per method and round. Command: "
            f"`python benchmarks/bench_scale.py {' '.join(sys.argv[1:])}`\n\n")
    est = (f"Expected time of the full-size run (same options without --quick, {args.threads} thread(s)), scaled "
           f"from this run by forward FLOPs and assuming the same number of products: ≈ {expected / 3600:.1f} h counting "
           f"products and forwards, ≤ {upper / 3600:.1f} h scaling every measured time (small models' per-call "
           f"overheads included), plus ~1 min of start-up per job; this run took {time.perf_counter() - t_start:.0f} s.")
    if args.only:
        est = f"Only the {args.only} jobs; this run took {time.perf_counter() - t_start:.0f} s."
    text = head + table + "\n\n" + "\n".join(notes) + "\n\n" + est + "\n"
    print(table + "\n\n" + "\n".join(notes) + "\n\n" + est)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
