"""HVP cost per vector, in units of one full-data gradient, for each autodiff path.

Setup (the task's reference): scikit-learn ``load_digits`` (first 1024 images, 4 batches of
256), float32, ``torch.set_num_threads(2)``; an MLP 64-128-128-10 (ReLU, ~26k parameters) and a
small CNN (conv 1→16→32 3×3, max-pool, linear 512→40→10, ~26k parameters); cross-entropy.
Each repeat times one full-data gradient and then the product back to back; the table shows
the median time and the median ratio, after a warm-up (which also builds the cached gradient
graphs of the double-backward path).

Run: ``python benchmarks/bench_hvp.py [--repeats 9]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from lossatlas.curvature import HessianOperator
from lossatlas.losses import batch_loss


def digits_batches(image: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first 1024 digits as 4 batches of 256, pixels scaled to [0, 1]."""
    X, y = load_digits(return_X_y=True)
    x = torch.tensor(X[:1024] / 16.0, dtype=torch.float32)
    x = x.reshape(-1, 1, 8, 8) if image else x  # (N, 1, 8, 8) or (N, 64)
    t = torch.tensor(y[:1024], dtype=torch.long)
    return [(x[i : i + 256], t[i : i + 256]) for i in range(0, 1024, 256)]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),  # (B, 16, 8, 8)
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),  # (B, 32, 8, 8)
        nn.MaxPool2d(2), nn.Flatten(),  # (B, 512)
        nn.Linear(512, 40), nn.ReLU(), nn.Linear(40, 10),
    )


def median_ratio(fn, unit, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn`` and median of (fn time / unit time), each repeat timing both
    back to back so that load from other processes on a shared machine cancels in the ratio."""
    fn(), unit()  # warm-up
    times, ratios = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        unit()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        times.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(times), statistics.median(ratios)


def full_gradient(model: nn.Module, batches) -> None:
    """One plain full-data gradient: forward + backward per batch (the cost unit)."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(int(x.shape[0]) for x, _ in batches)
    for x, y in batches:
        loss = batch_loss("cross_entropy", model(x), y) * (x.shape[0] / n)
        torch.autograd.grad(loss, params)


def bench(name: str, model: nn.Module, batches, repeats: int) -> list[tuple[str, str, float, float]]:
    model.eval()
    P = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    v1 = torch.randn(P, generator=gen)
    v8 = torch.randn(P, 8, generator=gen)

    def grad_fn():
        full_gradient(model, batches)

    t_grad, _ = median_ratio(grad_fn, grad_fn, repeats)
    rows = [(name, f"gradient (P={P})", t_grad, 1.0)]
    cases = [
        ("double_backward K=1, graph reused", dict(path="double_backward"), v1),
        ("double_backward K=1, graph rebuilt", dict(path="double_backward", graph_cache_bytes=0), v1),
        ("double_backward K=8, graph reused", dict(path="double_backward"), v8),
        ("forward_over_reverse K=1", dict(path="forward_over_reverse"), v1),
        ("forward_over_reverse K=8 (vmap)", dict(path="forward_over_reverse"), v8),
        ("auto K=1", dict(path="auto"), v1),
        ("auto K=8", dict(path="auto"), v8),
    ]
    for label, kw, V in cases:  # (PyHessian's own product follows, for reference)
        op = HessianOperator(model, batches, "cross_entropy", **kw)
        t, ratio = median_ratio(lambda op=op, V=V: op @ V, grad_fn, repeats)
        K = 1 if V.ndim == 1 else V.shape[1]
        rows.append((name, f"{label} [{op.path}]", t / K, ratio / K))
    t, ratio = median_ratio(pyhessian_product(model, batches), grad_fn, repeats)
    rows.append((name, "PyHessian hessian_vector_product (one batch)", t, ratio))
    return rows


def pyhessian_product(model: nn.Module, batches):
    """PyHessian's HVP on the same data as one batch, its gradient graph built once (as its eigensolver does)."""
    import copy
    import sys

    import pyhessian  # noqa: F401  (its __init__ shadows the submodule name with the class)

    ph = sys.modules["pyhessian.hessian"]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    h = ph.hessian(copy.deepcopy(model), nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    v = [torch.randn_like(p) for p in h.params]
    return lambda: ph.hessian_vector_product(h.gradsH, h.params, v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    rows = bench("MLP 64-128-128-10", mlp(), digits_batches(image=False), args.repeats)
    rows += bench("CNN 1-16-32 conv", cnn(), digits_batches(image=True), args.repeats)
    print(f"{'model':<20} {'what':<52} {'ms/vector':>10} {'gradients':>10}")
    for model_name, what, seconds, ratio in rows:
        print(f"{model_name:<20} {what:<52} {seconds * 1e3:>10.2f} {ratio:>10.2f}")


if __name__ == "__main__":
    main()
