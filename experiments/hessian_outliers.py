"""Bulk + outliers of the Hessian spectrum: the number of top outliers ≈ the number of classes C.

Claim (SCIENCE.md §2; Sagun, Bottou & LeCun 2017; Sagun et al. 2018; Papyan 2019/2020): the Hessian of a
trained classifier is a bulk near zero plus outliers, and the number of top outliers is ≈ C (not C − 1).

Setup: an MLP (dim-64-64-C, tanh) trained with full-batch Adam to a low loss on Gaussian mixtures with
C ∈ {3, 5, 8, 10} classes, and the reference MLP (64-128-128-10) on digits (C = 10). At the end of
training: the top 2C eigenvalues by block Lanczos (block size 2, so a pair of close outliers is seen
twice), the SLQ density, its bulk edge and the count of top eigenvalues above bulk_edge·(1 + 0.1).
Writes experiments/results/hessian_outliers.json and hessian_outliers.png. A few minutes of CPU.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lossatlas.models import build_data, build_model
from lossatlas.probes.curvature import HessianOperator
from lossatlas.probes.estimators import count_outliers, lanczos_eigs, slq_density
from lossatlas.probes.losses import batch_loss

RESULTS = Path(__file__).parent / "results"


def train(model, x, y, steps=400, lr=1e-2):
    """Full-batch Adam on the mean cross-entropy; returns the final loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = batch_loss("cross_entropy", model(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(batch_loss("cross_entropy", model(x), y))


def spectrum(model, x, y, C, seed=0):
    op = HessianOperator(model, [(x, y)], "cross_entropy", dtype=torch.float64)
    top = lanczos_eigs(op, 2 * C, block_size=2, tol=1e-6, seed=seed, return_eigenvectors=False)
    dens = slq_density(op, num_probes=4, num_steps=min(100, op.shape[0]), sigma_squared=1e-5, scale="log", seed=seed)
    n_out = count_outliers(dens, eigenvalues=top.eigenvalues)
    return top, dens, n_out, op.num_params


def run_case(label, data_spec, widths, C, steps):
    torch.manual_seed(0)
    x, y = build_data(data_spec)
    x = x.to(torch.float32)
    model = build_model({"name": "mlp", "kwargs": {"widths": widths, "activation": "tanh"}})
    t0 = time.perf_counter()
    final_loss = train(model, x, y, steps=steps)
    top, dens, n_out, P = spectrum(model, x, y, C)
    case = {
        "label": label, "C": C, "num_params": P, "num_examples": int(x.shape[0]), "final_loss": final_loss,
        "top_eigenvalues": top.eigenvalues.tolist(), "bulk_edge": dens.bulk_edge, "num_outliers": n_out,
        "claim": C, "matches_C": n_out == C, "equals_C_minus_1": n_out == C - 1, "elapsed_s": time.perf_counter() - t0,
    }
    print(f"{label}: C={C} outliers={n_out} loss={final_loss:.3g} top={np.round(top.eigenvalues[:C + 2], 3)}",
          file=sys.stderr)
    return case, dens, top


def main() -> dict:
    cases, curves = [], []
    for C in (3, 5, 8, 10):
        spec = {"name": "gaussian_mixture", "kwargs": {"num_classes": C, "dim": 20, "n_per_class": 100,
                                                        "separation": 4.0, "split": "all"}}
        case, dens, top = run_case(f"gaussian_mixture C={C}", spec, [20, 64, 64, C], C, steps=400)
        cases.append(case)
        curves.append((case["label"], dens, top))
    case, dens, top = run_case("digits C=10", {"name": "digits", "kwargs": {"split": "all"}}, [64, 128, 128, 10],
                               10, steps=400)
    cases.append(case)
    curves.append((case["label"], dens, top))
    summary = {
        "claim": "number of top Hessian outliers ≈ number of classes C (Sagun et al. 2017/2018; Papyan 2019/2020; "
                 "SCIENCE.md §2) — not C − 1",
        "method": "top 2C eigenvalues by block Lanczos (b=2), SLQ log-density (4 probes × 100 steps), outliers = "
                  "top eigenvalues above bulk_edge·1.1",
        "cases": cases,
        "matches": sum(c["matches_C"] for c in cases),
        "within_one": sum(abs(c["num_outliers"] - c["C"]) <= 1 for c in cases),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hessian_outliers.json").write_text(json.dumps(summary, indent=2))
    _figure(curves, RESULTS / "hessian_outliers.png")
    return summary


def _figure(curves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3), sharey=False)
    for ax, (label, dens, top) in zip(axes, curves):
        ax.semilogx(dens.grid, dens.density + 1e-7, lw=1)
        for lam in top.eigenvalues[top.eigenvalues > 0]:
            ax.axvline(lam, color="C3", lw=0.6, alpha=0.7)
        ax.axvline(dens.bulk_edge, color="k", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("|λ|")
    axes[0].set_ylabel("density of ln|λ| (SLQ)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(json.dumps(main(), indent=2))
