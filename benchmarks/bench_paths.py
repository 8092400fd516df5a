"""Cost per vector of each autodiff path and of ``path="auto"`` (its calibration included), in gradients.

Models: the reference MLP 64-128-128-10 (26k parameters) and the small ResNet with BatchNorm (19.7k,
``build_resnet()``) on the first 1024 ``load_digits`` images; the reference GPT (``build_gpt()``,
110k, 2 layers) on 16 random sequences of 32 tokens (``causal_lm``); an MLP 512-2048-2048-10
(5.27M) on 256 Gaussian inputs with random labels. Cross-entropy, float32, eval mode.

For K in (1, 8, 16) vectors per product, a workload of n products of K vectors (n = 20 for K = 1, as
in a Lanczos run; 10 for K = 8, as in SLQ with 8 probes; 7 for K = 16, as in Hutchinson with 100
products) runs on a fresh operator for each of ``double_backward``, ``forward_over_reverse``,
``auto`` (default: for K = 1 the likely winner runs the bucket's first 20 products and the other path
is tried on the 21st; for K ≥ 2 the other path is tried on the bucket's second product once its start-up is
paid in the process, as here, or a product takes ≥ 3 s) and ``auto, try
at once`` (``explore_ratio = 0``: both paths timed on the bucket's first two products, also for K = 1);
the time of the workload (graph building and auto's calibration included) divided by
n·K and by the time of one full-data gradient (forward + backward of the same model on the same
data, measured in the same round) is the cost in gradients per vector. Methods are interleaved in
rounds (their order rotated each round; each path's one-off imports are paid before the rounds, in
the process); the table shows medians over rounds. ``chose`` is the path "try at once" measured as
faster (what auto keeps once it has tried both); ``auto/best`` compares auto (calibration included)
with the faster explicit path, and the issue's floor is ≤ 1.10. ``extra MiB`` is the peak extra
memory the calibration measured for each path (CPU: resident-set growth).

Run: ``python benchmarks/bench_paths.py [--rounds 3] [--models mlp,cnn,gpt,mlp5m] [--device cpu|cuda]
[--scale 1.0] [--threads 2] [--examples 1024]`` (``--scale`` multiplies every n, at least 3 products).
Before the rounds, two untimed products per path and model take the one-off imports out of the timings.

One-off start-up, counted apart: the first use of a path in a process imports modules (the first
``create_graph`` gradient imports sympy; the first torch.func call imports torch._dynamo). The operator
runs it (``_warm_up``) before a timed product, so it never enters a path's timing or auto's choice. It
is measured here in fresh subprocesses (median of 3) and printed after the table: a process that runs
auto pays double backward's once and forward-over-reverse's once when auto first tries that path
(for K ≥ 2: on the bucket's second product), as does a process that asks for that path explicitly.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lossatlas.curvature import HessianOperator
from lossatlas.curvature.base import path_bucket
from lossatlas.losses import batch_loss
from lossatlas.models.gpt import build_gpt
from lossatlas.models.mlp import build_mlp
from lossatlas.models.resnet import build_resnet

EXPLICIT = ("double_backward", "forward_over_reverse")
SHORT = {"double_backward": "db", "forward_over_reverse": "fr"}
WORKLOAD = {1: 20, 8: 10, 16: 7}  # products per workload for each K (see the module docstring)


def digits(image: bool, n: int = 1024) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first n digits in batches of 256, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    x = torch.tensor(X[:n] / 16.0, dtype=torch.float32)
    x = x.reshape(-1, 1, 8, 8) if image else x
    t = torch.tensor(y[:n], dtype=torch.long)
    return [(x[i : i + 256], t[i : i + 256]) for i in range(0, n, 256)]


def cases(names: list[str], examples: int = 1024) -> list[tuple[str, nn.Module, list, str]]:
    """(label, model, batches, loss) for the requested models."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    out = []
    for name in names:
        if name == "mlp":
            out.append(("MLP 26k", build_mlp(), digits(False, examples), "cross_entropy"))
        elif name == "cnn":
            out.append(("ResNet-BN 19.7k", build_resnet(), digits(True, examples), "cross_entropy"))
        elif name == "gpt":
            tok = torch.randint(0, 64, (16, 32), generator=g)
            out.append(("GPT 110k", build_gpt(), [(tok, tok)], "causal_lm"))
        elif name == "mlp5m":
            x = torch.randn(256, 512, generator=g)
            y = torch.randint(0, 10, (256,), generator=g)
            out.append(("MLP 5.27M", build_mlp(widths=(512, 2048, 2048, 10)), [(x, y)], "cross_entropy"))
        else:
            raise SystemExit(f"unknown model {name!r}; choose from mlp, cnn, gpt, mlp5m")
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gradient_seconds(model: nn.Module, batches, loss: str, device: torch.device, repeats: int = 3) -> float:
    """Median seconds of one plain full-data gradient (the unit), after a warm-up."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(int(x.shape[0]) for x, _ in batches)
    times = []
    for i in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        for x, y in batches:
            torch.autograd.grad(batch_loss(loss, model(x), y) * (x.shape[0] / n), params)
        sync(device)
        if i:  # the first is the warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def workload(model, batches, loss, method: str, K: int, n: int, device: torch.device) -> dict:
    """Seconds of n products of K vectors on a fresh operator; for auto also its choice and sizes."""
    path = "auto" if method.startswith("auto") else method
    op = HessianOperator(model, batches, loss, path=path, check_deterministic=False)
    if method == "auto_now":
        op.explore_ratio = 0.0  # time both paths on the bucket's first two products
    op.point()  # copies and checks outside the timing (the same for every path)
    V = torch.randn(op.num_params, K, generator=torch.Generator().manual_seed(K), device=device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        op @ V
    sync(device)
    out = {"total": time.perf_counter() - t0}
    if path == "auto":
        b = path_bucket(K)
        out["chosen"] = op.chosen_path.get(b, op.path)
        out["extra"] = op.path_memory.get(b, {})
    return out


_STARTUP = """
import sys, time, torch
torch.set_num_threads(1)
from lossatlas.curvature.base import _warm_up
t0 = time.perf_counter()
_warm_up(sys.argv[1])
print(time.perf_counter() - t0)
"""


def startup_seconds(path: str, repeats: int = 3) -> float:
    """Median seconds of a path's one-off start-up (``_warm_up``) in a fresh process (after importing torch)."""
    import subprocess
    import sys

    times = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", _STARTUP, path], capture_output=True, text=True, check=True)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="mlp,cnn,gpt,mlp5m")
    parser.add_argument("--ks", default="1,8,16")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the products per workload (≥ 3)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--examples", type=int, default=1024, help="digits examples for the MLP and the ResNet")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ks = [int(k) for k in args.ks.split(",")]
    setups = []
    for label, model, batches, loss in cases(args.models.split(","), args.examples):
        model = model.to(device).eval()
        batches = [(x.to(device), y.to(device)) for x, y in batches]
        setups.append((label, model, batches, loss))
        for path in EXPLICIT:  # untimed: each path's one-off imports and allocations in this process
            workload(model, batches, loss, path, 1, 2, device)
    methods = (*EXPLICIT, "auto", "auto_now")
    rec: dict = {}
    for r in range(args.rounds):
        for label, model, batches, loss in setups:
            unit = gradient_seconds(model, batches, loss, device)
            for K in ks:
                n = max(3, round(WORKLOAD.get(K, 10) * args.scale))
                order = methods[r % len(methods) :] + methods[: r % len(methods)]  # rotate who goes first
                for method in order:
                    res = workload(model, batches, loss, method, K, n, device)
                    entry = rec.setdefault((label, K), {"n": n, "P": sum(p.numel() for p in model.parameters())})
                    entry.setdefault(method, []).append(res["total"] / (n * K) / unit)
                    entry.setdefault("unit", []).append(unit)
                    if method == "auto_now":
                        entry.setdefault("chosen", []).append(SHORT[res["chosen"]])
                        entry["extra"] = res["extra"]
            print(f"round {r + 1}/{args.rounds}: {label} done", flush=True)
    header = ("| model | P | K | n | gradient (ms) | double_backward | forward_over_reverse | auto | auto, try at once "
              "| chose | auto/best | ≤ 1.10 | try at once/best | extra MiB db / fr |")
    print()
    print(f"Gradients per vector (median of {args.rounds} interleaved rounds; device {device}, "
          f"{torch.get_num_threads()} threads)")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for (label, K), e in rec.items():
        med = {m: statistics.median(e[m]) for m in methods}
        best = min(med[p] for p in EXPLICIT)
        ratio = med["auto"] / best
        extra = " / ".join(
            "?" if e["extra"].get(p) is None else f"{e['extra'][p] / 2**20:.1f}" for p in EXPLICIT
        )
        chose = ",".join(sorted(set(e["chosen"])))
        print(f"| {label} | {e['P']} | {K} | {e['n']} | {statistics.median(e['unit']) * 1e3:.1f} "
              f"| {med['double_backward']:.2f} | {med['forward_over_reverse']:.2f} | {med['auto']:.2f} "
              f"| {med['auto_now']:.2f} | {chose} | {ratio:.2f} | {'✓' if ratio <= 1.10 else '✗'} "
              f"| {med['auto_now'] / best:.2f} | {extra} |")
    print()
    print("One-off start-up per process (fresh subprocess, median of 3; not in the table above): "
          + ", ".join(f"{p} {startup_seconds(p):.2f} s" for p in EXPLICIT))


if __name__ == "__main__":
    main()
