"""Edge of stability at CPU scale: λ_max·η/2 → 1 under full-batch GD.

Cohen, Kaur, Li, Kolter, Talwalkar, "Gradient descent on neural networks typically occurs at the edge of
stability" (ICLR 2021).

Claim: full-batch GD on a tanh MLP 16-64-64-4, 500 Gaussian-blob
points in 4 classes, one-hot targets, loss ((f − y)²).mean() over all entries (lossatlas "mse"),
float64: the sharpness λ_max first rises (progressive sharpening) and then hovers at the stability
threshold 2/η, λ_max·η/2 = 1 ± 0.05 for η = 0.8 and 1.6.

Method: λ_max every ``eig_every`` steps by Lanczos (k = 1, warm-started from the previous top
eigenvector) on ``HessianOperator``; phases by ``lossatlas.analysis.eos.eos_phases``; the ratio
statistics over the last half of training. Each run is logged through the Recorder
(``run_eta<η>.h5``, λ_max in the log as ``lambda_max``). A run that diverges stops at the first
non-finite loss and is reported as diverged, rather than overflowing to NaN silently.

    .venv/bin/python experiments/eos_gd.py [--quick] [--etas 0.4,0.8,1.6] [--steps 3000]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import out_dir, pyplot, save_figure, setup_threads, write_summary  # noqa: E402

from lossatlas.analysis.eos import eos_phases  # noqa: E402
from lossatlas.curvature import HessianOperator  # noqa: E402
from lossatlas.estimators import lanczos_eigs  # noqa: E402
from lossatlas.losses import batch_loss  # noqa: E402
from lossatlas.models import build_model  # noqa: E402
from lossatlas.recorder import Recorder  # noqa: E402

NAME = "eos_gd"
MODEL = {"name": "mlp", "kwargs": {"widths": [16, 64, 64, 4], "activation": "tanh"}}
CLAIM = ("Cohen et al. 2021 (ICLR): under full-batch GD the sharpness rises "
         "(progressive sharpening) and then hovers at 2/η: λ_max·η/2 = 1 ± 0.05 for η = 0.8 and 1.6")
TOLERANCE = 0.05


def blobs(n: int = 500, dim: int = 16, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs x = μ_y + ε (μ ~ N(0, I), ε ~ N(0, I)), standardized per feature; one-hot 0/1 targets."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    y = torch.arange(n) % classes
    x = centers[y] + torch.randn(n, dim, generator=g, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    return x, torch.nn.functional.one_hot(y, classes).to(torch.float64)


def sharpness(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, v0: torch.Tensor | None):
    """λ_max of the mean-MSE Hessian by Lanczos (k = 1, warm start ``v0``); returns (λ_max, eigenvector)."""
    op = HessianOperator(model, [(x, y)], "mse", dtype=torch.float64, check_deterministic=False)
    res = lanczos_eigs(op, 1, tol=1e-7, v0=v0, seed=0)
    return float(res.eigenvalues[0]), res.eigenvectors[:, 0]


def run(eta: float, steps: int, out: Path, eig_every: int = 25, seed: int = 0) -> tuple[dict, dict]:
    """Full-batch GD with step ``eta``; returns the summary row and the curves for the figure."""
    torch.manual_seed(seed)
    x, y = blobs()
    model = build_model(MODEL).to(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=eta)
    path = out / f"run_eta{eta:g}.h5"
    eig_steps, lams, loss_steps, losses = [], [], [], []
    v = None
    diverged_at = None
    t0 = time.perf_counter()
    with Recorder(str(path), model, opt, model_spec=MODEL, data_spec={"name": "eos_blobs", "kwargs": {"n": 500}},
                  loss="mse", checkpoint_every=max(1, steps // 6), max_steps=steps, overwrite=True,
                  per_tensor=False) as rec:
        for step in range(steps + 1):
            extra = {}
            if step % eig_every == 0:
                lam, v = sharpness(model, x, y, v)
                eig_steps.append(step)
                lams.append(lam)
                extra["lambda_max"] = lam
            loss = batch_loss("mse", model(x), y)
            if not math.isfinite(loss.item()):
                diverged_at = step
                rec.step(step, loss=loss.item(), **extra)
                break
            if step == steps:
                rec.step(step, loss=loss.item(), **extra)
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rec.step(step, loss=loss.item(), **extra)
            loss_steps.append(step)
            losses.append(loss.item())
    elapsed = time.perf_counter() - t0
    fin = np.isfinite(lams)
    a = eos_phases(np.asarray(eig_steps)[fin], np.asarray(lams)[fin], eta)
    r = np.asarray(a.ratio)
    s = np.asarray(a.steps)
    late = r[s >= steps // 2] if diverged_at is None else np.array([])
    row = {
        "eta": eta, "threshold_2_over_eta": 2 / eta, "steps": steps, "eig_every": eig_every,
        "diverged_at": diverged_at, "initial_lambda_max": lams[0], "initial_ratio": lams[0] * eta / 2,
        "final_lambda_max": lams[-1], "final_loss": losses[-1] if losses else None,
        "late_window": [steps // 2, steps],
        "late_ratio_mean": float(late.mean()) if late.size else None,
        "late_ratio_min": float(late.min()) if late.size else None,
        "late_ratio_max": float(late.max()) if late.size else None,
        "late_fraction_within_tol": float(np.mean(np.abs(late - 1) <= TOLERANCE)) if late.size else None,
        "progressive_sharpening": a.sharpening, "sharpening_rate_per_step": a.sharpening_rate,
        "eos_onset": a.eos_onset, "eos": a.eos, "eos_ratio_mean": a.eos_ratio_mean, "eos_ratio_std": a.eos_ratio_std,
        "run": path.name, "elapsed_s": elapsed,
    }
    return row, {"eig_steps": s, "ratio": r, "loss_steps": loss_steps, "loss": losses}


def figure(curves: dict, out: Path) -> list[str]:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (eta, c) in enumerate(curves.items()):
        a1.plot(c["eig_steps"], c["ratio"], color=f"C{i}", label=f"η = {eta:g}")
        a2.semilogy(c["loss_steps"], c["loss"], color=f"C{i}", lw=0.8, label=f"η = {eta:g}")
    a1.axhline(1.0, color="k", ls="--", lw=0.8)
    a1.axhspan(1 - TOLERANCE, 1 + TOLERANCE, color="0.85", zorder=0)
    a1.set(xlabel="step", ylabel="λ_max · η / 2", title="sharpness relative to 2/η")
    a2.set(xlabel="step", ylabel="train loss (mean MSE)", title="full-batch GD, tanh MLP 16-64-64-4")
    a1.legend()
    fig.tight_layout()
    return save_figure(fig, out, NAME)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder (default experiments/results/eos_gd)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--etas", default="0.4,0.8,1.6")
    ap.add_argument("--eig-every", type=int, default=25)
    ap.add_argument("--quick", action="store_true", help="1200 steps, λ_max every 50 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.eig_every = 1200, 50
    setup_threads()
    out = out_dir(NAME, args.out)
    t0 = time.time()
    rows, curves = [], {}
    for eta in (float(e) for e in args.etas.split(",")):
        row, curves[eta] = run(eta, args.steps, out, eig_every=args.eig_every)
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("eta", "late_ratio_mean", "late_ratio_min", "late_ratio_max",
                                              "eos_onset", "progressive_sharpening", "diverged_at", "elapsed_s")}),
              file=sys.stderr, flush=True)
    files = figure(curves, out)
    at_edge = [r for r in rows if r["late_ratio_mean"] is not None and r["eos_onset"] is not None]
    summary = {
        "experiment": NAME, "claim": CLAIM, "paper": "Cohen, Kaur, Li, Kolter, Talwalkar, ICLR 2021, arXiv 2103.00065",
        "settings": {"steps": args.steps, "etas": [r["eta"] for r in rows], "eig_every": args.eig_every,
                     "quick": args.quick, "model": MODEL, "data": "500 standardized Gaussian blobs, 16-D, 4 classes",
                     "loss": "mse (mean over N·C entries)", "dtype": "float64",
                     "sharpness": "Lanczos top-1 on HessianOperator, warm-started"},
        "ours": rows,
        "verdict": {
            "etas_at_edge": [r["eta"] for r in at_edge],
            "etas_within_tol_on_average": [r["eta"] for r in at_edge if abs(r["late_ratio_mean"] - 1) <= TOLERANCE],
            "diverged": [r["eta"] for r in rows if r["diverged_at"] is not None],
        },
        "figures": files, "elapsed_s": time.time() - t0,
        "reproduce": "OMP_NUM_THREADS=1 .venv/bin/python experiments/eos_gd.py",
    }
    write_summary(out, summary)
    return summary


if __name__ == "__main__":
    s = main()
    print(json.dumps({"experiment": NAME, "verdict": s["verdict"], "elapsed_s": round(s["elapsed_s"], 1)}))
