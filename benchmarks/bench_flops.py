"""FLOPs of a Hessian-vector product per vector, in gradients, counted (not timed) with FlopCounterMode.

Is the floor "a batched product of K = 8 vectors costs ≤ 1.5 gradients per vector" reachable? Time is
noisy on a shared CPU; FLOPs are not. ``torch.utils.flop_counter.FlopCounterMode`` counts the matmul,
convolution and attention FLOPs of every op that runs (elementwise ops are not counted: they are not
where the time of these models goes). Units: one full-data gradient (forward + backward) of the same
model on the same data = 1.

Rows (all through ``lossatlas.curvature.HessianOperator`` except ``is_grads_batched``):

- ``HVP, 1 vector``: double backward without a kept graph (``graph_cache_bytes=0``): forward,
  ``create_graph`` backward, second backward (Pearlmutter 1994, "Fast exact multiplication by the
  Hessian").
- ``K=8 db lean``: one graph built per product, 8 second backwards, per vector.
- ``K=8 db cached``: the second product of an operator that kept the graph (the steady state of a
  run): 8 second backwards, per vector.
- ``K=8 is_grads_batched``: ``torch.autograd.grad(g, θ, V, is_grads_batched=True)`` on a fresh
  graph (vmapped second backward), per vector.
- ``K=8 fwd-over-rev``: ``torch.func.vmap(jvp(grad(L)))`` over the 8 vectors (the operator's
  ``forward_over_reverse`` path), per vector.

Counting argument (a dense layer y = Wx, matmul units of one product W·x): the gradient costs 3
(forward Wx, backward Wᵀg and g xᵀ). The product with a tangent (Ẇ, ẋ) needs, besides the primal's
3, the tangent forward Ẇx + Wẋ (2), the tangent backward Wᵀġ + Ẇᵀg (2) and ġxᵀ + gẋᵀ (2): 6 more per
vector, i.e. 2 gradients per vector once the primal is shared among K vectors; reverse-over-reverse
is the transpose of the same computation (Griewank & Walther 2008, "Evaluating Derivatives", ch. 5),
with the same count. So ≤ 1.5 gradients per vector is impossible for an exact product by counting;
the table shows how close each path comes.

Models: the dense MLP 512-2048-2048-10 (5.27M, 256 examples), and the QUICK GPT-2 and ResNet of
``benchmarks/bench_scale.py`` (float32, eval mode, cross-entropy).

Run: ``python benchmarks/bench_flops.py [--models mlp5m,gpt2,resnet18] [--k 8]``; results in
``benchmarks/results/bench_flops.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lossatlas.curvature import HessianOperator  # noqa: E402
from lossatlas.models.mlp import build_mlp  # noqa: E402


def case(name: str):
    """(label, model, batches, loss) for one model name."""
    if name == "mlp5m":
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        x = torch.randn(256, 512, generator=g)
        y = torch.randint(0, 10, (256,), generator=g)
        return "MLP 512-2048-2048-10", build_mlp(widths=(512, 2048, 2048, 10)).eval(), [(x, y)], "cross_entropy"
    import bench_scale

    model, batches = bench_scale.build(name, bench_scale.QUICK[name])
    return f"{name} (bench_scale QUICK)", model, batches, "cross_entropy"


def flops(fn) -> float:
    """Matmul/conv/attention FLOPs of everything ``fn`` runs."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def count(name: str, K: int) -> dict:
    """FLOPs of a gradient and, per vector, of each product variant (module docstring)."""
    label, model, batches, loss = case(name)

    def op(path: str = "double_backward", cache: int = 2 * 2**30) -> HessianOperator:
        o = HessianOperator(model, batches, loss, path=path, check_deterministic=False, graph_cache_bytes=cache)
        o.point()  # set up (copies, checks) outside the count
        return o

    P = op().num_params
    V = torch.randn(P, K, generator=torch.Generator().manual_seed(0))
    g_op = op()
    grad = flops(g_op.loss_and_gradient)
    out = {"model": label, "P": P, "gradient": grad}
    lean = op(cache=0)
    out["hvp1"] = flops(lambda: lean @ V[:, 0])
    out["db_lean"] = flops(lambda: lean @ V) / K
    cached = op()
    cached @ V  # builds and keeps the graph
    out["db_cached"] = flops(lambda: cached @ V) / K
    out["fr"] = flops(lambda: op("forward_over_reverse") @ V) / K

    o = op()
    leaves = o._leaves()
    vs = [t.movedim(-1, 0) for t in o.unflatten(V).values()]

    def batched():
        with o._modes():
            (x, y), = o._ready()["batches"]
            gs = torch.autograd.grad(o._batch_loss(leaves, x, y), list(leaves.values()), create_graph=True)
            torch.autograd.grad(gs, list(leaves.values()), vs, is_grads_batched=True)

    out["batched"] = flops(batched) / K
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp5m,gpt2,resnet18")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cols = [("hvp1", "HVP, 1 vector"), ("db_lean", f"K={args.k} db lean"), ("db_cached", f"K={args.k} db cached"),
            ("batched", f"K={args.k} is_grads_batched"), ("fr", f"K={args.k} fwd-over-rev")]
    header = "| model | P | gradient GFLOP | " + " | ".join(c for _, c in cols) + " | best K-batched ≤ 1.5 |"
    print(f"FLOPs per vector in gradients (FlopCounterMode: matmul/conv/attention FLOPs; K = {args.k})")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in args.models.split(","):
        r = count(name, args.k)
        g = r["gradient"]
        best = min(r[k] for k in ("db_lean", "db_cached", "batched", "fr")) / g
        print(f"| {r['model']} | {r['P']:,} | {g / 1e9:.3f} | " + " | ".join(f"{r[k] / g:.2f}" for k, _ in cols)
              + f" | {best:.2f} {'✓' if best <= 1.5 else '✗'} |", flush=True)


if __name__ == "__main__":
    main()
