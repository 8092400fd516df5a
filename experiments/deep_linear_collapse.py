"""Neural collapse across every layer of deep linear networks (Dang et al. 2023, ICML).

Unconstrained-features model: a bias-free ``nn.Sequential`` of Linear layers fed one-hot sample indicators, so the
first layer's weight columns are the free features h_i (its weight decay is λ_H||H||²) and the next M layers are
the deep linear classifier W_M⋯W_1 (weight decay λ_W each). Trained to a global minimizer by full-batch L-BFGS in
float64 from a random start, for MSE with balanced and imbalanced classes and for cross-entropy with balanced
classes; the ``collapse`` probe with ``layers="all"`` then measures NC1–NC3 at the input of every Linear, and the
MSE runs are compared with the closed form of ``lossatlas.probes.deep_linear`` (orthogonal frame when balanced,
general orthogonal frame when imbalanced).

Run: ``python experiments/deep_linear_collapse.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import out_dir, pyplot, save_figure, setup_threads, write_summary  # noqa: E402

from lossatlas.probes.base import ProbeContext  # noqa: E402
from lossatlas.probes.collapse import NeuralCollapse  # noqa: E402
from lossatlas.probes.deep_linear import layer_frame_metrics, minimizer_geometry  # noqa: E402

NAME = "deep_linear_collapse"
PAPER = ("Dang, Tran, Osher, Tran-The, Ho, Nguyen 2023, ICML, \"Neural Collapse in Deep Linear Networks: From "
         "Balanced to Imbalanced Data\" (arXiv 2301.00437)")
CLAIM = ("at the global minimizers of deep linear unconstrained-features models with weight decay, neural collapse "
         "holds at every linear layer: NC1 (features collapse to class means), and for MSE the class means and the "
         "end-to-end weights form an orthogonal frame (balanced) or a general orthogonal frame whose lengths are "
         "given in closed form by the class sizes n_k and the regularisation (imbalanced); for cross-entropy "
         "(balanced) a simplex ETF with W aligned to the means (NC2, NC3)")
DT = torch.float64
CASES = {  # label: (loss, class sizes, layers M, width d, λ_W, λ_H)
    "mse_balanced": ("mse", [8, 8, 8, 8], 3, 8, 5e-3, 5e-3),
    "mse_imbalanced": ("mse", [16, 16, 8, 8, 4, 2], 3, 8, 5e-3, 5e-3),
    "ce_balanced_m2": ("ce", [8, 8, 8, 8], 2, 8, 5e-3, 5e-3),
    "ce_balanced_m3": ("ce", [8, 8, 8, 8], 3, 8, 5e-3, 5e-3),
}
RESTARTS = 4  # seeds 0..3 for each initial scale; the lowest objective over all starts is the minimizer
INIT_STDS = (0.5, 1.0)  # weights N(0, std²)
QUICK_SCALE = 0.5  # --quick halves the class sizes
# Criteria fixed before the run: loss within LOSS_RTOL of the closed-form f*; every GOF/OF distance and relative
# norm error below FRAME_TOL; NC1 below NC1_TOL; for CE the ETF distance and NC3 below FRAME_TOL — at every layer.
LOSS_RTOL = 1e-6
FRAME_TOL = 1e-3
NC1_TOL = 1e-6


def labels_for(counts: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])


def build(n: int, d: int, c: int, m: int, seed: int, std: float) -> nn.Sequential:
    """Linear(N, d) holding Hᵀ, then M − 1 Linear(d, d) and Linear(d, C), all bias-free, float64."""
    torch.manual_seed(seed)
    layers = [nn.Linear(n, d, bias=False)] + [nn.Linear(d, d, bias=False) for _ in range(m - 1)]
    layers.append(nn.Linear(d, c, bias=False))
    model = nn.Sequential(*layers).to(DT)
    for lin in model:
        nn.init.normal_(lin.weight, std=std)
    return model


def objective(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, loss: str, lw: float, lh: float) -> torch.Tensor:
    """1/(2N) Σ||f(x_i) − e_{y_i}||² (or mean CE) + λ_H/2 ||H||² + λ_W/2 Σ_m ||W_m||²."""
    out = model(x)
    if loss == "mse":
        fit = ((out - nn.functional.one_hot(y, out.shape[1]).to(DT)) ** 2).sum() / (2 * len(y))
    else:
        fit = nn.functional.cross_entropy(out, y)
    reg = lh / 2 * (model[0].weight ** 2).sum() + lw / 2 * sum((lin.weight ** 2).sum() for lin in model[1:])
    return fit + reg


def train_lbfgs(model, x, y, loss, lw, lh, rounds: int = 4) -> tuple[float, float]:
    """Full-batch L-BFGS (strong Wolfe) to a stationary point; returns (final objective, gradient max-norm)."""
    params = list(model.parameters())
    opt = torch.optim.LBFGS(params, lr=1, max_iter=4000, tolerance_grad=1e-13, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = objective(model, x, y, loss, lw, lh)
        value.backward()
        return value

    for _ in range(rounds):
        opt.step(closure)
    value = closure()
    return float(value.detach()), max(float(p.grad.abs().max()) for p in params)


def run_case(label: str, scale: float) -> dict:
    loss, counts, m, d, lw, lh = CASES[label]
    counts = [max(1, round(n * scale)) for n in counts]
    y = labels_for(counts)
    x = torch.eye(len(y), dtype=DT)  # one-hot sample indicators: layer 0's weight columns are the features h_i
    t0 = time.time()
    starts = []
    for seed, std in [(a, b) for b in INIT_STDS for a in range(RESTARTS)]:  # s = 0 is a local minimum of g_k
        cand = build(len(y), d, len(counts), m, seed=seed, std=std)
        starts.append((*train_lbfgs(cand, x, y, loss, lw, lh), cand))
    final, grad, model = min(starts, key=lambda t: t[0])
    res = NeuralCollapse(layers="all").run(ProbeContext(model=model, data=[(x, y)]))
    v = res.values
    keys = ("layer_nc1", "layer_nc2_equinorm_means", "layer_nc2_etf_means", "layer_of_means",
            "layer_nc2_equinorm_weights", "layer_nc3_self_duality", "layer_nc3_uncentred")
    per_layer = {k: [float(a) for a in np.asarray(v[k])[1:]] for k in keys}  # layers 1..M (layer 0 = indicators)
    row = {"case": label, "loss": loss, "counts": counts, "layers": m, "width": d, "lambda_w": lw, "lambda_h": lh,
           "final_objective": final, "grad_max": grad, "restart_objectives": [t[0] for t in starts],
           "rank_of_means": int(torch.linalg.matrix_rank(
               torch.stack([model[0].weight.detach().T[y == k].mean(0) for k in range(len(counts))]), rtol=1e-6)), "per_layer": per_layer, "elapsed_s": None}
    checks = {"nc1_every_layer": max(per_layer["layer_nc1"]) < NC1_TOL}
    if loss == "mse":
        geo = minimizer_geometry(counts, m, lw, lh)
        ws = [lin.weight.detach() for lin in model[1:]]
        h = model[0].weight.detach().T
        means = torch.stack([h[y == k].mean(0) for k in range(len(counts))])
        frames, feats = [], means
        for layer in range(1, m + 1):
            prod = ws[-1]
            for w in reversed(ws[layer - 1:-1]):
                prod = prod @ w
            frames.append(layer_frame_metrics(prod, feats, geo, layer))
            feats = feats @ ws[layer - 1].T
        row.update({"closed_form": {"x": geo["x"], "s": geo["s"], "mean_norm": geo["mean_norm"],
                                    "product_singular": geo["product_singular"], "loss": geo["loss"]},
                    "frames": frames, "loss_rel_gap": abs(final - geo["loss"]) / geo["loss"]})
        feats = means
        measured = []
        for layer in range(1, m + 1):
            measured.append([float(a) for a in feats.norm(dim=1)])
            feats = feats @ ws[layer - 1].T
        row["measured_mean_norm"] = measured
        checks["loss_equals_closed_form"] = row["loss_rel_gap"] < LOSS_RTOL
        checks["frame_every_layer"] = max(max(f.values()) for f in frames) < FRAME_TOL
    else:
        checks["etf_every_layer"] = max(per_layer["layer_nc2_etf_means"]) < FRAME_TOL
        checks["nc3_every_layer"] = max(per_layer["layer_nc3_self_duality"]) < FRAME_TOL
    row["verdict"] = {**checks, "all": all(checks.values())}
    row["elapsed_s"] = time.time() - t0
    return row


def figure(rows: list[dict], out: Path) -> list[str]:
    """Left: class-mean norms per layer, measured (markers) vs closed form (lines), imbalanced MSE; right: NC metrics."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    imb = next((r for r in rows if r["case"] == "mse_imbalanced"), None)
    if imb is not None:
        closed = np.asarray(imb["closed_form"]["mean_norm"])
        meas = np.asarray(imb["measured_mean_norm"])
        layers = np.arange(1, imb["layers"] + 1)
        for k, n_k in enumerate(imb["counts"]):
            line = axes[0].plot(layers, closed[:, k], lw=1, label=f"n_k={n_k}")[0]
            axes[0].plot(layers, meas[:, k], "o", color=line.get_color(), ms=5, mfc="none")
        axes[0].set(xlabel="layer m (input of W_m)", ylabel="||class mean||", title="imbalanced MSE: GOF lengths")
        axes[0].legend(fontsize=7)
    for r in rows:
        for key, marker in (("layer_nc1", "o"), ("layer_nc3_self_duality", "s"), ("layer_of_means", "^")):
            vals = np.maximum(np.asarray(r["per_layer"][key], float), 1e-18)
            axes[1].semilogy(np.arange(1, len(vals) + 1), vals, marker=marker, lw=0.8, label=f"{r['case']}: {key}")
    axes[1].set(xlabel="layer m", title="NC1, NC3 (centred), OF distance per layer")
    axes[1].legend(fontsize=5)
    fig.tight_layout()
    return save_figure(fig, out, NAME)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help=f"class sizes × {QUICK_SCALE}")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    args = ap.parse_args(argv)
    setup_threads()
    out = out_dir(NAME, args.out)
    t0 = time.time()
    scale = QUICK_SCALE if args.quick else 1.0
    labels = [c for c in args.cases.split(",") if c]
    unknown = [c for c in labels if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    rows = [run_case(label, scale) for label in labels]
    for r in rows:
        print(json.dumps({k: r[k] for k in ("case", "final_objective", "verdict")}), file=sys.stderr, flush=True)
    files = figure(rows, out)
    reproduced = all(r["verdict"]["all"] for r in rows)
    mse_ok = all(r["verdict"]["all"] for r in rows if r["loss"] == "mse")
    summary = {
        "experiment": NAME, "claim": CLAIM, "paper": PAPER,
        "method": "unconstrained features as the weight of a Linear layer on one-hot sample indicators; full-batch "
                  f"L-BFGS in float64 from {RESTARTS} seeds x init std {INIT_STDS}, lowest objective kept; "
                  " collapse probe with layers='all' on the training set; "
                  "closed form from lossatlas.probes.deep_linear.minimizer_geometry",
        "settings": {"quick": args.quick, "scale": scale, "cases": {label: CASES[label] for label in labels},
                     "restarts": RESTARTS, "criteria": {"loss_rtol": LOSS_RTOL, "frame_tol": FRAME_TOL, "nc1_tol": NC1_TOL}},
        "ours": rows, "claim_reproduced": reproduced,
        "verdict": {**{r["case"]: r["verdict"] for r in rows}, "claim_reproduced": reproduced,
                    "mse_closed_form_reproduced": mse_ok,
                    "note": "claim_reproduced needs every case; a CE case whose lowest objective is a lower-rank "
                            "configuration (rank_of_means < C-1) is not a simplex ETF: deep weight decay's low-rank "
                            "bias beats collapse there (cf. Sukenik, Lampert, Mondelli 2024, 'Neural collapse versus "
                            "low-rank bias: is deep neural collapse really optimal?'); each case lists the objectives "
                            "of all restarts"},
        "figures": files, "elapsed_s": time.time() - t0,
        "reproduce": "OMP_NUM_THREADS=1 .venv/bin/python experiments/deep_linear_collapse.py"
                     + (" --quick" if args.quick else ""),
    }
    write_summary(out, summary)
    return summary


if __name__ == "__main__":
    main()
