"""Top-1 eigenvalue of the reference MLP: where Lanczos's products go, and what was tried to need fewer.

Run: ``python benchmarks/bench_top1.py`` (``BENCH_SEED``, ``BENCH_TRAIN_STEPS``, ``BENCH_THREADS`` as in
bench_eigs.py, whose setup it shares: 1024 digits examples in 4 batches of 256, cross-entropy, float32).

1. Trace: the float32 Lanczos run step by step against a float64 reference — the true relative error
   of the top Ritz value and our eigenvalue error bound (what ``criterion="eigenvalue"`` stops on: the
   Kato–Temple bound only beside a converged neighbour, else the residual; see ``lanczos_eigs``),
   i.e. the first product at which 1e-4 is reached and the one at which we can know it.
2. Alternatives to a single random start, timed against it in interleaved rounds (median of
   ``BENCH_REPEATS``), each stopping at tol 1e-4 on the full operator: block Lanczos (b vectors per
   product call), a start vector from Lanczos on a data subsample, from the classifier head's Hessian
   block, and the gradient. Products of the helper operators are counted separately.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_eigs import REPEATS, THREADS, pin_malloc, rel_err, setup  # noqa: E402

from lossatlas.curvature import HessianOperator  # noqa: E402
from lossatlas.estimators import lanczos as L  # noqa: E402
from lossatlas.estimators import lanczos_eigs  # noqa: E402
from lossatlas.estimators._checks import make_generator  # noqa: E402
from lossatlas.estimators._recurrence import BlockLanczos  # noqa: E402

TOL = 1e-4


def trace(model, batches, ref: float, steps: int = 24) -> None:
    op = HessianOperator(model, batches, "cross_entropy")
    gen = make_generator(0, op.device)
    start = L._start_block(None, op.num_params, 1, op.dtype, op.device, gen)
    run = BlockLanczos(op, start.T.unsqueeze(0), steps + 1, "full", gen)
    first_true = first_known = None
    print("step  true rel. error  estimate")
    for s in range(1, steps + 1):
        run.step(need_next=True)
        ritz = L._ritz(run, 1, "LA")
        theta = ritz[0]
        true = abs(theta[0] - ref) / ref
        floor = L._ROUNDING_FACTOR * float(torch.finfo(op.dtype).eps) * float(run.anorm[0])  # as lanczos_eigs
        est = L._error(ritz, "LA", floor, "eigenvalue")[0] / abs(theta[0])
        first_true = first_true or (s if true <= TOL else None)
        first_known = first_known or (s if est <= TOL else None)
        print(f"{s:4d}  {true:15.1e}  {est:8.1e}")
    print(f"true error <= {TOL:g} first at product {first_true}; the estimate confirms it at {first_known}")


def _embed(op, part_op, vec) -> torch.Tensor:
    """A vector of ``part_op``'s parameters placed into ``op``'s parameter space (zeros elsewhere)."""
    full = torch.zeros(op.num_params, dtype=op.dtype)
    parts, given = op.unflatten(full), part_op.unflatten(vec)
    for name, t in given.items():
        parts[name].copy_(t)
    return full


def alternatives(model, batches, full, ref: float) -> None:
    x, y = full
    head = [n for n, _ in model.named_parameters()][-2:]  # the classifier's weight and bias

    def run(v0=None, block=1):
        op = HessianOperator(model, batches, "cross_entropy")
        start = None if v0 is None else v0(op)
        r = lanczos_eigs(op, 1, tol=TOL, criterion="eigenvalue", return_eigenvectors=False, v0=start, block_size=block)
        return r.eigenvalues, op.matvecs

    def from_subsample(n):
        def v0(op):
            sub = HessianOperator(model, [(x[:n], y[:n])], "cross_entropy")
            vec = lanczos_eigs(sub, 1, tol=3e-2, criterion="eigenvalue").eigenvectors[:, 0]
            counts[f"subsample {n}"] = sub.matvecs
            return vec
        return v0

    def from_head(op):
        hop = HessianOperator(model, batches, "cross_entropy", params=head)
        vec = lanczos_eigs(hop, 1, tol=1e-2, criterion="eigenvalue").eigenvectors[:, 0]
        counts["head block"] = hop.matvecs
        return _embed(op, hop, vec)

    def from_gradient(op):
        return op.loss_and_gradient()[1]

    counts: dict[str, int] = {}
    plan = {"single random start (default)": lambda: run()}
    for b in (2, 4, 8):
        plan[f"block Lanczos b={b}"] = lambda b=b: run(block=b)
    for n in (256, 512):
        plan[f"subsample {n}"] = lambda n=n: run(v0=from_subsample(n))
    plan["head block"] = lambda: run(v0=from_head)
    plan["gradient"] = lambda: run(v0=from_gradient)
    times = {k: [] for k in plan}
    outs = {}
    for fn in plan.values():
        fn()
    for _ in range(REPEATS):
        for k, fn in plan.items():
            time.sleep(0.3)
            t0 = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["single random start (default)"])
    print(f"\n{'start':32s} {'time (s)':>9s} {'vs default':>10s} {'full products':>14s} {'helper products':>16s} {'rel. error':>10s}")
    for k in plan:
        vals, mv = outs[k]
        t = statistics.median(times[k])
        print(f"{k:32s} {t:9.3f} {t / base:9.2f}× {mv:14d} {counts.get(k, 0):16d} {rel_err(vals, np.array([ref])):10.1e}")


def main() -> None:
    torch.set_num_threads(THREADS)
    pin_malloc()
    model, batches, full = setup("mlp")
    ref = float(lanczos_eigs(HessianOperator(model, batches, "cross_entropy", dtype=torch.float64), 2, tol=1e-10,
                             return_eigenvectors=False).eigenvalues[0])
    print(f"reference MLP (seed {os.environ.get('BENCH_SEED', '0')}), lambda1 = {ref:.6f}")
    trace(model, batches, ref)
    alternatives(model, batches, full, ref)


if __name__ == "__main__":
    main()
