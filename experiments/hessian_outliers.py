"""Bulk + outliers of the Hessian spectrum: the number of top outliers ≈ the number of classes C.

Claim (Sagun, Bottou & LeCun 2017; Sagun, Evci, Güney, Dauphin & Bottou 2018; Papyan 2019 ICML,
2020 JMLR): the Hessian
of a trained classifier is a bulk near zero plus outliers, and the number of top outliers is ≈ C
(not C − 1); the outliers come from the Gauss–Newton term G (class means of logit gradients).

Setup: a tanh MLP (20-64-64-C) trained by full-batch Adam (lr 1e-3) on Gaussian mixtures with
C ∈ {3, 5, 8, 10} classes (20-D, 100 points per class, neighbouring means 3 apart), and the
reference MLP (64-128-128-10, relu) on the 8×8 digits (C = 10), each stopped at a *moderate*
train loss (first step with cross-entropy ≤ ``target_loss`` = 0.1; training to 1e-4 flattens the
spectrum so that ≈ 2C values leave the bulk). At that point, float64, for the Hessian and the GGN:

- the top 3C eigenvalues by block Lanczos (block size C, so that a cluster of C close outliers is
  resolved: a single start vector sees each distinct eigenvalue once);
- count by the **gap**: the position of the largest ratio λ_i/λ_{i+1} among the top 3C positive
  Ritz values (i ≤ 2C) — our primary count;
- count by the **SLQ bulk edge**: a log-scale SLQ density (4 probes × 80 steps), its bulk edge, and
  the number of top-3C eigenvalues above edge·1.1 (``count_outliers``) — reported next to it.

Writes experiments/results/hessian_outliers/{summary.json, hessian_outliers.png/.pdf, run_*.h5}.

    .venv/bin/python experiments/hessian_outliers.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import out_dir, pyplot, save_figure, setup_threads, write_summary  # noqa: E402

from lossatlas.curvature import GGNOperator, HessianOperator  # noqa: E402
from lossatlas.estimators import count_outliers, lanczos_eigs, slq_density  # noqa: E402
from lossatlas.losses import batch_loss  # noqa: E402
from lossatlas.models import build_data, build_model  # noqa: E402
from lossatlas.recorder import Recorder  # noqa: E402

NAME = "hessian_outliers"
CLAIM = ("number of top Hessian outliers ≈ number of classes C (Sagun et al. 2017/2018; Papyan 2019/2020), "
         "not C − 1")


def mixture_spec(C: int) -> dict:
    return {"name": "gaussian_mixture", "kwargs": {"num_classes": C, "dim": 20, "n_per_class": 100,
                                                    "separation": 3.0, "split": "all"}}


CASES = [
    *[(f"gaussian_mixture C={C}", mixture_spec(C),
       {"name": "mlp", "kwargs": {"widths": [20, 64, 64, C], "activation": "tanh"}}, C) for C in (3, 5, 8, 10)],
    ("digits C=10", {"name": "digits", "kwargs": {"split": "all"}},
     {"name": "mlp", "kwargs": {"widths": [64, 128, 128, 10], "activation": "relu"}}, 10),
]


def gap_count(eigenvalues: np.ndarray, max_count: int) -> int:
    """Outliers by the largest multiplicative gap: argmax_i λ_i/λ_{i+1} over positive descending λ, i ≤ max_count."""
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    lam = lam[lam > 0]
    if lam.size < 2:
        return int(lam.size)
    ratios = lam[:-1] / lam[1:]
    return int(np.argmax(ratios[:max_count])) + 1


def train(model, x, y, run_path: Path, model_spec: dict, data_spec: dict, *, target_loss: float, max_steps: int,
          lr: float = 1e-3) -> tuple[int, float]:
    """Full-batch Adam on the mean cross-entropy until loss ≤ target_loss; returns (steps, loss)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    step, loss_v = 0, float("nan")
    with Recorder(str(run_path), model, opt, model_spec=model_spec, data_spec=data_spec, loss="cross_entropy",
                  overwrite=True, per_tensor=False, save_optimizer_state=False) as rec:
        rec.checkpoint(0)
        for step in range(1, max_steps + 1):
            loss = batch_loss("cross_entropy", model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rec.step(step, loss=loss.item())
            with torch.no_grad():
                loss_v = float(batch_loss("cross_entropy", model(x), y))
            if loss_v <= target_loss:
                break
        rec.checkpoint(step, loss=loss_v)
    return step, loss_v


def spectrum(op, C: int, *, slq_steps: int, seed: int = 0) -> dict:
    """Top-3C eigenvalues (block Lanczos, block size C), SLQ log density, and both outlier counts."""
    top = lanczos_eigs(op, 3 * C, block_size=C, tol=1e-6, seed=seed, return_eigenvectors=False)
    dens = slq_density(op, num_probes=4, num_steps=min(slq_steps, op.shape[0]), sigma_squared=1e-5, scale="log",
                       seed=seed)
    return {"top": top.eigenvalues, "converged": int(top.converged.sum()), "density": dens,
            "count_gap": gap_count(top.eigenvalues, 2 * C),
            "count_bulk_edge": count_outliers(dens, eigenvalues=top.eigenvalues),
            "bulk_edge": dens.bulk_edge, "matvecs": top.matvecs + dens.matvecs}


def run_case(label: str, data_spec: dict, model_spec: dict, C: int, out: Path, *, target_loss: float,
             max_steps: int, slq_steps: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    x, y = build_data(data_spec)
    x = x.to(torch.float32)
    model = build_model(model_spec)
    t0 = time.perf_counter()
    run_path = out / f"run_{label.split()[0]}_C{C}.h5"
    steps, final_loss = train(model, x, y, run_path, model_spec, data_spec, target_loss=target_loss,
                              max_steps=max_steps)
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    data = [(x.to(torch.float64), y)]
    hess = spectrum(HessianOperator(model, data, "cross_entropy", dtype=torch.float64), C, slq_steps=slq_steps)
    ggn = spectrum(GGNOperator(model, data, "cross_entropy", dtype=torch.float64), C, slq_steps=slq_steps)
    case = {
        "label": label, "C": C, "num_params": sum(p.numel() for p in model.parameters()),
        "num_examples": int(x.shape[0]), "train_steps": steps, "final_loss": final_loss, "train_accuracy": acc,
        "hessian": {"top_eigenvalues": hess["top"], "num_converged": hess["converged"], "bulk_edge": hess["bulk_edge"],
                    "outliers_by_gap": hess["count_gap"], "outliers_above_bulk_edge": hess["count_bulk_edge"]},
        "ggn": {"top_eigenvalues": ggn["top"], "num_converged": ggn["converged"], "bulk_edge": ggn["bulk_edge"],
                "outliers_by_gap": ggn["count_gap"], "outliers_above_bulk_edge": ggn["count_bulk_edge"]},
        "claim": C, "run": run_path.name, "elapsed_s": time.perf_counter() - t0,
    }
    print(f"{label}: steps={steps} loss={final_loss:.3g} Hessian gap={hess['count_gap']} "
          f"edge={hess['count_bulk_edge']} | GGN gap={ggn['count_gap']} edge={ggn['count_bulk_edge']} "
          f"top={np.round(hess['top'][:C + 2], 3)} ({case['elapsed_s']:.0f}s)", file=sys.stderr, flush=True)
    return case, {"label": label, "C": C, "hess": hess, "ggn": ggn}


def figure(curves: list[dict], out: Path) -> list[str]:
    plt = pyplot()
    n = len(curves)
    fig, axes = plt.subplots(2, n, figsize=(3.1 * n, 5.4), squeeze=False)
    for j, c in enumerate(curves):
        for i, kind in enumerate(("hess", "ggn")):
            ax, sp = axes[i, j], c[kind]
            d = sp["density"]
            ax.loglog(d.grid, d.density + 1e-7, lw=0.9, color="C0")
            top = sp["top"][sp["top"] > 0]
            for rank, lam in enumerate(top):
                ax.axvline(lam, color="C3" if rank < sp["count_gap"] else "0.6", lw=0.7, alpha=0.8)
            ax.axvline(d.bulk_edge, color="k", ls="--", lw=0.8)
            ax.set_title(f"{c['label']}\n{'Hessian' if kind == 'hess' else 'GGN'}: gap {sp['count_gap']}, "
                         f"edge {sp['count_bulk_edge']}", fontsize=8)
            ax.set_xlabel("|λ|", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("SLQ density of ln|λ|", fontsize=8)
    axes[1, 0].set_ylabel("SLQ density of ln|λ|", fontsize=8)
    fig.suptitle("top-3C Ritz values (red: counted outliers, grey: rest), dashed: SLQ bulk edge", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out, NAME)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder (default experiments/results/hessian_outliers)")
    ap.add_argument("--target-loss", type=float, default=0.1)
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--slq-steps", type=int, default=80)
    ap.add_argument("--quick", action="store_true", help="the Gaussian mixtures only, 50 SLQ steps")
    ap.add_argument("--cases", type=int, default=None, help="run only the first N cases (smoke tests)")
    args = ap.parse_args(argv)
    setup_threads()
    out = out_dir(NAME, args.out)
    cases_in = (CASES[:4] if args.quick else CASES)[: args.cases]
    slq_steps = 50 if args.quick else args.slq_steps
    t0 = time.time()
    cases, curves = [], []
    for label, data_spec, model_spec, C in cases_in:
        case, curve = run_case(label, data_spec, model_spec, C, out, target_loss=args.target_loss,
                               max_steps=args.max_steps, slq_steps=slq_steps)
        cases.append(case)
        curves.append(curve)
    files = figure(curves, out)

    def tally(kind: str, how: str) -> dict:
        counts = [c[kind][how] for c in cases]
        return {"counts": counts, "C": [c["C"] for c in cases],
                "equal_C": sum(n == c["C"] for n, c in zip(counts, cases)),
                "equal_C_minus_1": sum(n == c["C"] - 1 for n, c in zip(counts, cases)),
                "within_one_of_C": sum(abs(n - c["C"]) <= 1 for n, c in zip(counts, cases)), "of": len(cases)}

    summary = {
        "experiment": NAME, "claim": CLAIM,
        "paper": "Sagun, Bottou, LeCun 2017 (arXiv 1611.07476); Sagun et al. 2018 (arXiv 1706.04454); "
                 "Papyan 2019 (arXiv 1901.08244), 2020 (arXiv 2008.11865)",
        "method": "full-batch Adam to train CE ≤ target_loss; float64 top-3C eigenvalues by block Lanczos "
                  "(block size C); primary count = largest ratio gap λ_i/λ_{i+1} among the top 3C (i ≤ 2C); "
                  "secondary = top-3C values above SLQ log-density bulk edge·1.1",
        "settings": {"target_loss": args.target_loss, "max_steps": args.max_steps, "slq_steps": slq_steps,
                     "quick": args.quick},
        "ours": cases,
        "verdict": {"hessian_gap": tally("hessian", "outliers_by_gap"),
                    "hessian_bulk_edge": tally("hessian", "outliers_above_bulk_edge"),
                    "ggn_gap": tally("ggn", "outliers_by_gap"),
                    "ggn_bulk_edge": tally("ggn", "outliers_above_bulk_edge")},
        "figures": files, "elapsed_s": time.time() - t0,
        "reproduce": "OMP_NUM_THREADS=1 .venv/bin/python experiments/hessian_outliers.py",
    }
    write_summary(out, summary)
    return summary


if __name__ == "__main__":
    s = main()
    print(json.dumps({"experiment": NAME, "verdict": s["verdict"], "elapsed_s": round(s["elapsed_s"], 1)}))
