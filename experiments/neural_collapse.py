"""Neural collapse in the terminal phase of training (Papyan, Han & Donoho 2020, PNAS; SCIENCE.md §6).

The reference-style MLP is trained with SGD + momentum and weight decay on a balanced Gaussian mixture
(and on digits) far past zero training error, through the Recorder; the ``collapse`` probe then measures
NC1–NC4 at log-spaced checkpoints. Claim: in the terminal phase NC1 = tr(Σ_W Σ_B⁺)/C falls by orders of
magnitude, and the NC2 equinorm/equiangularity measures, NC3 self-duality and the NC4 nearest-class-
centre mismatch approach 0.

Run: ``python experiments/neural_collapse.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import out_dir, pyplot, save_figure, setup_threads, write_summary  # noqa: E402

from lossatlas.analysis.runner import RunOptions, run_probe  # noqa: E402
from lossatlas.probes.collapse import NeuralCollapse  # noqa: E402
from lossatlas.train import TrainConfig, train  # noqa: E402

NAME = "neural_collapse"
CLAIM = ("terminal phase of training: NC1 falls by orders of magnitude; NC2 (equinorm, equiangularity), NC3 "
         "(self-duality) and NC4 (NCC mismatch) approach 0 (Papyan, Han & Donoho 2020)")
CASES = {
    "gaussian_mixture": ({"name": "mlp", "kwargs": {"widths": [16, 128, 128, 5]}},
                         {"name": "gaussian_mixture", "kwargs": {"num_classes": 5, "dim": 16, "n_per_class": 100,
                                                                 "separation": 6.0}}),
    "digits": ({"name": "mlp", "kwargs": {"widths": [64, 128, 128, 10]}}, {"name": "digits"}),
}
SERIES = ("nc1", "nc2_equinorm_means", "nc2_equiangular_means", "nc2_max_angle_means", "nc3_self_duality",
          "nc4_ncc_mismatch")


def run_case(label: str, steps: int, out: Path) -> dict:
    model, data = CASES[label]
    run = out / f"run_{label}.h5"
    cfg = TrainConfig(model=model, data=data, optimizer="sgd", lr=0.2, momentum=0.9, weight_decay=5e-3,
                      batch_size=0, steps=steps, log_spaced=12, seed=0)
    t0 = time.time()
    train(cfg, str(run), overwrite=True)
    results = out / f"run_{label}.results.h5"
    if results.exists():
        results.unlink()
    report = run_probe(run, NeuralCollapse(), RunOptions(steps="all", results_path=results))
    series = {name: [float(r.values[name]) if name in r.values else float("nan") for r in report.results]
              for name in SERIES}
    accuracy = [float(r.values["classifier_accuracy"]) for r in report.results]
    ckpt = [o.step for o in report.outcomes]
    zero_error = next((s for s, a in zip(ckpt, accuracy) if a >= 1.0), None)
    nc1 = np.asarray(series["nc1"])
    first = int(np.argmax(np.asarray(accuracy) >= 1.0)) if zero_error is not None else len(ckpt) - 1
    return {"case": label, "steps": ckpt, "train_accuracy": accuracy, "first_zero_error_step": zero_error,
            "series": series, "nc1_at_zero_error": float(nc1[first]), "nc1_final": float(nc1[-1]),
            "nc1_decades_after_zero_error": float(np.log10(nc1[first] / nc1[-1])),
            "nc1_decades_total": float(np.log10(nc1[0] / nc1[-1])),
            "final": {k: v[-1] for k, v in series.items()}, "elapsed_s": time.time() - t0}


def figure(rows: list[dict], out: Path) -> list[str]:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(rows), figsize=(3.4 * len(rows), 2.8), squeeze=False)
    for ax, row in zip(axes[0], rows):
        steps = np.maximum(np.asarray(row["steps"]), 1)
        for name in SERIES:
            v = np.asarray(row["series"][name])
            ax.plot(steps, np.maximum(v, 1e-8), marker="o", ms=2.5, lw=1, label=name)
        if row["first_zero_error_step"]:
            ax.axvline(row["first_zero_error_step"], color="0.5", ls="--", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="step", ylabel="metric", title=row["case"].replace("_", " "))
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, out, NAME)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--quick", action="store_true", help="5000 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps = 5000
    setup_threads()
    out = out_dir(NAME, args.out)
    t0 = time.time()
    rows = [run_case(label, args.steps, out) for label in CASES]
    for r in rows:
        print(json.dumps({k: r[k] for k in ("case", "first_zero_error_step", "nc1_at_zero_error", "nc1_final",
                                            "nc1_decades_total", "final")}), file=sys.stderr, flush=True)
    files = figure(rows, out)
    summary = {"experiment": NAME, "claim": CLAIM, "paper": "Papyan, Han & Donoho 2020, PNAS (arXiv 2008.08186)",
               "settings": {"steps": args.steps, "quick": args.quick, "optimizer": "full-batch SGD, lr 0.2, "
                            "momentum 0.9, weight decay 5e-3"},
               "ours": rows, "figures": files, "elapsed_s": time.time() - t0,
               "reproduce": "python experiments/neural_collapse.py" + (" --quick" if args.quick else "")}
    write_summary(out, summary)
    return summary


if __name__ == "__main__":
    main()
