"""Time per surface grid point, in units of one full-data forward pass (lossatlas.probes.surface).

(a) naive loop (loss-landscape style): deepcopy the model and load_state_dict at every point;
(b) functional per point: ``functional_call`` on a fresh parameter dict (PointEvaluator(vectorize=False) with
    point sessions off);
(b') a point session (the default on CPU): the module swapped once for a preallocated buffer, each point written
    in place (PointEvaluator(vectorize=False));
(c) vmapped chunks: C points per forward through ``torch.func.vmap`` (PointEvaluator, chunk_size=C).

Usage: python benchmarks/bench_surface.py [--model mlp|cnn] [--points 16] [--device cpu] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch
from torch import nn

from lossatlas import losses as L
from lossatlas.probes.directions import random_direction
from lossatlas.probes.grid import PointEvaluator, evaluate_grid, grid_points


def build(kind: str, device: str) -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        x = torch.randn(2048, 1, 28, 28)
    else:
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(32, 10),
        )
        x = torch.randn(512, 3, 32, 32)
    y = torch.randint(0, 10, (x.shape[0],))
    model = model.to(device).eval()
    data = [(x[i : i + 256].to(device), y[i : i + 256].to(device)) for i in range(0, x.shape[0], 256)]
    return model, data


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    ap.add_argument("--points", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunks", default="4,16")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model, data = build(args.model, args.device)
    dx, dy = random_direction(model, seed=123), random_direction(model, seed=124)
    side = int(np.ceil(np.sqrt(args.points)))
    pts = grid_points(np.linspace(-1, 1, side), np.linspace(-1, 1, side))[: args.points]
    n = len(pts)

    def forward_once():
        with torch.no_grad():
            for x, y in data:
                out = model(x)
                float(L.batch_loss("cross_entropy", out, y))
                L.correct_count(out, y)

    def naive():
        base = model.state_dict()
        for a, b in pts:
            net = copy.deepcopy(model)
            state = {k: (v + a * dx.tensors[k] + b * dy.tensors[k]) if k in dx.tensors else v for k, v in base.items()}
            net.load_state_dict(state)
            net.eval()
            with torch.no_grad():
                for x, y in data:
                    out = net(x)  # loss and accuracy from one forward, as the engine does
                    float(L.batch_loss("cross_entropy", out, y))
                    L.correct_count(out, y)

    def engine(chunk: int, vec: bool, session: bool = True):
        def go():
            ev = PointEvaluator(model, {}, [dx, dy], data, "cross_entropy", vectorize=vec)
            if not session:
                ev._session_ok = lambda: False  # the per-point functional_call path
            evaluate_grid(ev, pts, chunk_size=chunk)
        return go

    t_fwd = timed(forward_once, args.device)
    rows = {"forward_s": t_fwd, "naive": timed(naive, args.device) / n / t_fwd,
            "functional": timed(engine(1, False, session=False), args.device) / n / t_fwd,
            "session": timed(engine(1, False), args.device) / n / t_fwd}
    for c in [int(c) for c in args.chunks.split(",")]:
        rows[f"vmap_chunk{c}"] = timed(engine(c, True), args.device) / n / t_fwd
    report = {"model": args.model, "device": args.device, "points": n, "threads": torch.get_num_threads(),
              "time_per_point_in_forwards": rows}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.model} on {args.device}, {n} points, one full-data forward = {t_fwd * 1e3:.1f} ms")
        for k, v in rows.items():
            if k != "forward_s":
                print(f"  {k:>14}: {v:6.2f} forward passes per point")


if __name__ == "__main__":
    main()
