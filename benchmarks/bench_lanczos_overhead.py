"""Bookkeeping overhead of the Lanczos eigensolver and SLQ: time outside ``A @ V`` vs total.

The operator is a cheap synthetic one of size P = 26000 (diagonal bulk plus a rank-10 outlier
part, applied as a function), which times its own products; everything else — the three-term
recurrence, full reorthogonalization, QR, the small eigenproblems, Ritz vectors — is bookkeeping.
Because this operator is far cheaper than a Hessian-vector product, the raw ratio overstates the
overhead; the script therefore also times real HVPs (forward-over-reverse, vmapped over a block)
of a ≈26k-parameter MLP on 1024 and 4096 examples and reports bookkeeping / (matvecs × real HVP time),
the share the overhead would have on the real operator.

Run (one thread gives stable timings on a shared machine): ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lanczos_overhead.py [--json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from lossatlas.estimators import lanczos_eigs, slq_density

P = 26000
EXAMPLES = (1024, 4096)  # data-set sizes of the real HVP


class TimedLowRankPlusDiagonal:
    """A = diag(d) + U diag(s) Uᵀ as a function of V; accumulates the seconds spent in ``@``."""

    def __init__(self, P: int, rank: int = 10, dtype: torch.dtype = torch.float32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.d = torch.rand(P, generator=g, dtype=torch.float64).to(dtype)  # bulk in [0, 1)
        U, _ = torch.linalg.qr(torch.randn(P, rank, generator=g, dtype=torch.float64))
        self.U = U.to(dtype)
        self.s = torch.linspace(20.0, 5.0, rank, dtype=dtype)  # outliers
        self.shape, self.dtype, self.device = (P, P), dtype, torch.device("cpu")
        self.seconds, self.matvecs = 0.0, 0

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        W = V if V.ndim == 2 else V[:, None]
        out = self.d[:, None] * W + self.U @ (self.s[:, None] * (self.U.T @ W))
        self.seconds += time.perf_counter() - t
        self.matvecs += W.shape[1]
        return out if V.ndim == 2 else out[:, 0]


def real_hvp_seconds(block: int, n_examples: int, dtype: torch.dtype = torch.float32, repeats: int = 5) -> tuple[int, float]:
    """(P, seconds per vector) of a forward-over-reverse HVP of a ≈26k-parameter MLP, vmapped over ``block`` vectors.

    The median over ``repeats`` timings, since the machine may be shared.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 192), nn.Tanh(), nn.Linear(192, 64), nn.Tanh(), nn.Linear(64, 10)).to(dtype)
    params = {k: v.detach() for k, v in model.named_parameters()}
    n_params = sum(p.numel() for p in params.values())
    x, y = torch.randn(n_examples, 64, dtype=dtype), torch.randint(0, 10, (n_examples,))

    def loss(p):
        logits = torch.func.functional_call(model, p, (x,))
        return -(logits.log_softmax(-1).gather(1, y[:, None])).mean()

    grad = torch.func.grad(loss)

    def hvp(v):
        return torch.func.jvp(grad, (params,), (v,))[1]

    vs = {k: torch.randn(block, *p.shape, dtype=dtype) for k, p in params.items()}
    batched = torch.func.vmap(hvp)
    batched(vs)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        batched(vs)
        times.append(time.perf_counter() - t)
    return n_params, statistics.median(times) / block


def measure(label: str, dtype: torch.dtype, run) -> dict:
    op = TimedLowRankPlusDiagonal(P, dtype=dtype)
    t = time.perf_counter()
    info = run(op)
    total = time.perf_counter() - t
    book = total - op.seconds
    return {"case": label, "dtype": str(dtype).replace("torch.", ""), "total_s": total, "operator_s": op.seconds,
            "bookkeeping_s": book, "bookkeeping_share_of_total": book / total, "matvecs": op.matvecs, **info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()

    def eig(block):
        def run(op):
            r = lanczos_eigs(op, 5, tol=1e-4, block_size=block)
            return {"iterations": r.iterations, "converged": bool(r.converged.all())}
        return run

    def slq(op):
        d = slq_density(op, num_probes=4, num_steps=90)
        return {"iterations": d.num_steps, "outliers": int(d.outliers.size)}

    rows = [
        measure("lanczos k=5 tol=1e-4 b=1", torch.float32, eig(1)),
        measure("lanczos k=5 tol=1e-4 b=1", torch.float64, eig(1)),
        measure("lanczos k=5 tol=1e-4 b=5", torch.float32, eig(5)),
        measure("slq n_v=4 m=90", torch.float32, slq),
    ]
    hvp_cache: dict[tuple[int, int], tuple[int, float]] = {}
    for row in rows:
        block = row["matvecs"] // max(row["iterations"], 1)
        for n_ex in EXAMPLES:
            if (block, n_ex) not in hvp_cache:
                hvp_cache[block, n_ex] = real_hvp_seconds(block, n_ex)
            n_params, sec = hvp_cache[block, n_ex]
            row["real_hvp_P"] = n_params
            row[f"real_hvp_s_per_vector_N{n_ex}"] = sec
            row[f"bookkeeping_over_real_hvp_time_N{n_ex}"] = row["bookkeeping_s"] / (row["matvecs"] * sec)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"P = {P}, torch threads = {torch.get_num_threads()}")
    for r in rows:
        print(f"{r['case']:<28} {r['dtype']:<8} matvecs {r['matvecs']:>4}  total {r['total_s']:.3f}s  "
              f"operator {r['operator_s']:.3f}s  bookkeeping {r['bookkeeping_s']:.3f}s "
              f"({100 * r['bookkeeping_share_of_total']:.0f}% of total)")
        for n_ex in EXAMPLES:
            print(f"{'':<37} vs real HVPs (MLP P={r['real_hvp_P']}, N={n_ex}: "
                  f"{1e3 * r[f'real_hvp_s_per_vector_N{n_ex}']:.2f} ms/vector): "
                  f"bookkeeping = {100 * r[f'bookkeeping_over_real_hvp_time_N{n_ex}']:.1f}% of operator time")


if __name__ == "__main__":
    main()
