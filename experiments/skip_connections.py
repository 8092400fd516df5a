"""Skip connections and chaotic landscapes: filter-normalised surfaces and the convexity map of ResNets with and
without shortcuts at two depths (Li, Xu, Taylor, Studer, Goldstein 2018, "Visualizing the Loss Landscape of
Neural Nets", NeurIPS 2018).

Claim: without skip connections the loss landscape turns chaotic (strongly non-convex) as the network gets
deeper, while the ResNet with shortcuts stays smooth and nearly convex. Li et al. show it with filter-normalised
2-D surfaces and with the map of |λ_min/λ_max| of the Hessian over the plane: near 0 where the landscape is
locally convex, large where it has strong negative curvature.

Setup: the registry's ``resnet`` (stages of widths ``--widths``, ``b`` BasicBlocks per stage, so depth
2 + 2·b·stages counting the stem and the classifier; ``skip=False`` is Li et al.'s no-short variant) on
scikit-learn's 8×8 digits (train split; ``--image-size 16`` upsamples them bilinearly to 16×16), trained by SGD
(momentum 0.9, batch 128) for ``--steps`` steps, once with and once without shortcuts at each of two depths, same
seed and same recipe. The learning rate is ``--lr`` constant by default; with ``--warmup w`` it rises linearly from
lr/100 to lr over the first w steps, and with ``--cosine`` it then decays as lr·½(1 + cos(π·t/T)) over the remaining
T steps (``--large`` uses both: without the warmup the no-short-56 net stays at loss ln 10). Then in eval mode (BatchNorm with its running statistics), by the ``surface`` probe with
``convexity=True`` (``lossatlas.api.surface``, ``lossatlas.probes.convexity``):

- the surface L(θ + α d_x + β d_y) on a ``--grid``² grid of [−1, 1]² (random filter-normalised directions,
  seed 123, BatchNorm and biases left unperturbed), on ``--n-examples`` examples;
- the convexity map on every ``--cstride``-th point of that grid along each axis: λ_max and λ_min of the
  Hessian of the loss by Lanczos (tolerance ``--tol``, at most ``--iters`` steps per eigenvalue) and the ratio
  r = |λ_min/λ_max|.

Criterion (fixed in code before the run, ``RATIO_FACTOR``): the mean of r over the convexity grid of the deep
no-skip network is more than twice that of the deep skip network, and larger than the shallow no-skip network's
(non-convexity grows with depth without shortcuts). Training gate (``MIN_TRAIN_ACC``): the comparison only tests
the claim at minimisers, so the verdict is inconclusive (``claim_reproduced`` None, with the reason) unless every net
classifies at least 90% of the ``--n-examples`` examples of the surface correctly at θ*.

    .venv/bin/python experiments/skip_connections.py --quick    # depths 8/20 on 8×8 digits, ≈4 min
    .venv/bin/python experiments/skip_connections.py --large    # depths 20/56 on 16×16 digits, ≈16 min
    .venv/bin/python experiments/skip_connections.py --larger   # as --large with 2500 SGD steps, ≈20 min
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

from lossatlas.api import surface  # noqa: E402
from lossatlas.models import build_data, build_model  # noqa: E402

NAME = "skip_connections"
CLAIM = ("Li et al. 2018: without skip connections the loss landscape becomes chaotic and non-convex as depth grows "
         "(large |λ_min/λ_max| over the filter-normalised plane), while ResNets with shortcuts stay smooth and nearly "
         "convex")
RATIO_FACTOR = 2.0  # deep no-skip mean |λ_min/λ_max| must exceed this multiple of deep skip's
MIN_TRAIN_ACC = 0.9  # training gate: every net must reach this accuracy on the surface examples, else inconclusive


def upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Flat 8×8 images (N, 64) bilinearly resized to size×size (N, size²); size 8 returns them unchanged."""
    if size == 8:
        return x
    img = torch.nn.functional.interpolate(x.reshape(-1, 1, 8, 8), size=(size, size), mode="bilinear",
                                          align_corners=False)
    return img.reshape(x.shape[0], size * size).contiguous()


def lr_at(step: int, lr: float, steps: int, warmup: int = 0, cosine: bool = False) -> float:
    """The learning rate of step ``step`` (0-based) of ``steps``.

    lr·(0.01 + 0.99·t/w) for t < w = ``warmup`` (linear warmup from lr/100), then lr, or with ``cosine``
    lr·½(1 + cos(π·(t − w)/(steps − w))) (the cosine decay of Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient
    Descent with Warm Restarts"). Defaults: no warmup, constant lr.
    """
    if step < warmup:
        return lr * (0.01 + 0.99 * step / warmup)
    if not cosine:
        return lr
    return lr * 0.5 * (1.0 + float(np.cos(np.pi * (step - warmup) / max(1, steps - warmup))))


def training_gate(accuracies: dict[str, float], threshold: float = MIN_TRAIN_ACC) -> tuple[bool, str]:
    """Whether every net reached ``threshold`` train accuracy, and the reason when not (\"\" when all did)."""
    low = {k: a for k, a in accuracies.items() if not a >= threshold}  # `not >=` also catches NaN
    if not low:
        return True, ""
    return False, ("inconclusive: " + ", ".join(f"{k} train accuracy {a:.3f}" for k, a in low.items())
                   + f" < {threshold:g}, so its map is not that of a minimiser")


def train_model(depth_blocks: int, skip: bool, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> torch.nn.Module:
    """A resnet with ``depth_blocks`` blocks per stage trained by SGD with momentum (schedule ``lr_at``); eval mode."""
    torch.manual_seed(args.seed)
    model = build_model({"name": "resnet", "kwargs": {"widths": args.widths, "blocks_per_stage": depth_blocks,
                                                       "skip": skip, "image_size": args.image_size}})
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:  # warmup / cosine schedule (constant lr by default)
            group["lr"] = lr_at(step, args.lr, args.steps, args.warmup, args.cosine)
        idx = torch.randint(0, x.shape[0], (args.batch,), generator=gen)  # a mini-batch drawn with replacement
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def roughness(loss: np.ndarray) -> float:
    """Mean |discrete Laplacian| of log L over the interior of the grid: 0 for a plane, large for a chaotic surface."""
    z = np.log(np.maximum(loss, 1e-12))
    lap = z[1:-1, :-2] + z[1:-1, 2:] + z[:-2, 1:-1] + z[2:, 1:-1] - 4 * z[1:-1, 1:-1]
    return float(np.mean(np.abs(lap)))


def convexity_summary(res) -> dict:
    """The convexity map of a surface Result (``convexity=True``) and its mean, median, max and share above 0.1."""
    ratio = np.asarray(res.values["convexity_ratio"], dtype=np.float64)
    return {"lambda_max": np.asarray(res.values["convexity_lambda_max"], dtype=np.float64),
            "lambda_min": np.asarray(res.values["convexity_lambda_min"], dtype=np.float64), "ratio": ratio,
            "coords": np.asarray(res.coords["cx"], dtype=np.float64),
            "mean_ratio": float(np.nanmean(ratio)), "median_ratio": float(np.nanmedian(ratio)),
            "max_ratio": float(np.nanmax(ratio)), "frac_ratio_above_0.1": float(np.nanmean(ratio > 0.1)),
            "all_converged": bool(np.all(res.values["convexity_converged"])),
            "matvecs": int(res.meta["convexity"]["matvecs"]), "convexity_s": float(res.meta["convexity"]["elapsed_s"])}


def figure(out: Path, rows: dict, coords: np.ndarray) -> list[str]:
    plt = pyplot()
    labels = list(rows)
    fig, axes = plt.subplots(2, len(labels), figsize=(3.6 * len(labels), 6.6), squeeze=False)
    vmax = max(float(np.nanmax(r["convexity"]["ratio"])) for r in rows.values())
    for c, label in enumerate(labels):
        r = rows[label]
        loss = np.asarray(r["surface_loss"])
        cs = axes[0, c].contour(coords, coords, np.log10(np.maximum(loss, 1e-12)), levels=20, cmap="viridis")
        axes[0, c].clabel(cs, fontsize=5)
        axes[0, c].set(title=f"{label}: log10 loss", xlabel="α", ylabel="β")
        cv = r["convexity"]
        im = axes[1, c].imshow(cv["ratio"], origin="lower", extent=(cv["coords"][0], cv["coords"][-1]) * 2,
                               vmin=0, vmax=vmax, cmap="magma")
        axes[1, c].set(title=f"|λmin/λmax| mean {cv['mean_ratio']:.3f}", xlabel="α", ylabel="β")
        fig.colorbar(im, ax=axes[1, c], fraction=0.046)
    fig.tight_layout()
    return save_figure(fig, out, NAME)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder (default experiments/results/skip_connections)")
    ap.add_argument("--depths", default="1,3", help="blocks per stage of the shallow and deep nets (depth 2+2·b·stages)")
    ap.add_argument("--widths", default="8,16,32", help="channels per stage")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=0, help="linear warmup steps from lr/100 (0: none)")
    ap.add_argument("--cosine", action="store_true", help="cosine decay of the lr to 0 after the warmup")
    ap.add_argument("--n-examples", type=int, default=256, help="examples for the surface and the Hessians")
    ap.add_argument("--grid", type=int, default=21, help="surface grid points per axis on [-1, 1]")
    ap.add_argument("--cstride", type=int, default=5, help="the convexity map takes every k-th surface grid point")
    ap.add_argument("--iters", type=int, default=10, help="most Lanczos steps per eigenvalue and map point")
    ap.add_argument("--tol", type=float, default=1e-2, help="Lanczos tolerance of the convexity map")
    ap.add_argument("--image-size", type=int, default=8, help="digits resized bilinearly to this size (8: as is)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="13×13 surface, 128 examples, 8 Lanczos steps")
    ap.add_argument("--large", action="store_true",
                    help="depths 20/56 (widths 8,8,8) on 16×16 digits, 128 examples, 13×13 surface, 5×5 map")
    ap.add_argument("--larger", action="store_true",
                    help="as --large with 2500 SGD steps (same warmup and cosine recipe), so no-short-56 trains too")
    args = ap.parse_args(argv)
    if args.large or args.larger:  # Li et al.'s depths 20 and 56 at a size one core can afford (the numbers in the README)
        args.depths, args.widths, args.image_size, args.steps = "3,9", "8,8,8", 16, 1000
        args.lr, args.warmup, args.cosine = 0.05, 100, True  # warmup: no-short-56 stays at ln 10 without it
        args.n_examples, args.grid, args.cstride, args.iters = 128, 13, 3, 20
        if args.larger:  # 1000 steps leave no-short-56 at train accuracy 0.79 (loss 0.47); the rest as --large
            args.steps = 2500
    args.widths = [int(w) for w in args.widths.split(",")]
    depths = [int(b) for b in args.depths.split(",")]
    if args.quick:  # a coarser surface, fewer examples and Lanczos steps: ≈4 min on one core
        args.grid, args.n_examples, args.iters = min(args.grid, 13), min(args.n_examples, 128), min(args.iters, 8)
        args.cstride = max(1, (args.grid - 1) // 4)  # a 5×5 map at α, β ∈ {−1, −½, 0, ½, 1} of the 13×13 grid
    setup_threads()
    out = out_dir(NAME, args.out)
    t0 = time.time()
    x, y = build_data({"name": "digits"})
    x = upsample(x, args.image_size)
    data = (x[: args.n_examples], y[: args.n_examples])
    rows, ours = {}, {}
    for b in depths:
        depth = 2 + 2 * b * len(args.widths)
        for skip in (True, False):
            label = f"{'resnet' if skip else 'noshort'}-{depth}"
            t1 = time.time()
            model = train_model(b, skip, x, y, args)
            with torch.no_grad():
                acc = float((model(x).argmax(1) == y).float().mean())  # on the whole train split it trained on
                acc_ex = float((model(data[0]).argmax(1) == data[1]).float().mean())  # on the surface examples
                print(json.dumps({label: {"train_accuracy": acc, "train_accuracy_surface_examples": acc_ex,
                                          "train_s": time.time() - t1}}), file=sys.stderr, flush=True)
            res = surface(model, data, xrange=(-1.0, 1.0, args.grid), batch_size=None, convexity=True,
                          convexity_stride=args.cstride, convexity_tol=args.tol, convexity_max_iter=args.iters)
            loss = np.asarray(res.values["loss"], dtype=np.float64)
            cv = convexity_summary(res)
            rows[label] = {"surface_loss": loss, "convexity": cv}
            ours[label] = {"depth": depth, "skip": skip, "blocks_per_stage": b, "train_accuracy": acc,
                           "train_accuracy_surface_examples": acc_ex,
                           "loss_at_center": float(loss[args.grid // 2, args.grid // 2]),
                           "surface_roughness": roughness(loss), "surface_loss_max": float(loss.max()),
                           **{k: cv[k] for k in ("mean_ratio", "median_ratio", "max_ratio", "frac_ratio_above_0.1",
                                                 "all_converged", "matvecs", "convexity_s")},
                           "lambda_max_center": float(cv["lambda_max"][len(cv["coords"]) // 2,
                                                                       len(cv["coords"]) // 2]),
                           "ratio_map": cv["ratio"], "lambda_max_map": cv["lambda_max"],
                           "lambda_min_map": cv["lambda_min"], "elapsed_s": time.time() - t1}
            print(json.dumps({label: {k: ours[label][k] for k in ("train_accuracy", "loss_at_center", "mean_ratio",
                                                                  "surface_roughness", "lambda_max_center", "matvecs",
                                                                  "all_converged", "convexity_s", "elapsed_s")}}),
                  file=sys.stderr, flush=True)
    files = figure(out, rows, np.linspace(-1.0, 1.0, args.grid))
    shallow, deep = 2 + 2 * depths[0] * len(args.widths), 2 + 2 * depths[-1] * len(args.widths)
    m = {k: v["mean_ratio"] for k, v in ours.items()}
    deep_noskip, deep_skip = m[f"noshort-{deep}"], m[f"resnet-{deep}"]
    shallow_noskip = m[f"noshort-{shallow}"]
    verdict = {
        "mean_ratio": m, "deep_noskip_over_deep_skip": deep_noskip / deep_skip if deep_skip > 0 else float("inf"),
        "deep_noskip_over_shallow_noskip": deep_noskip / shallow_noskip if shallow_noskip > 0 else float("inf"),
        "criterion": (f"mean |λ_min/λ_max| over the {len(cv['coords'])}×{len(cv['coords'])} map: noshort-{deep} > "
                      f"{RATIO_FACTOR:g}× resnet-{deep}, and noshort-{deep} > noshort-{shallow}"),
    }
    passed, reason = training_gate({k: v["train_accuracy_surface_examples"] for k, v in ours.items()})
    verdict["gate"] = (f"training gate: every net's train accuracy on the {args.n_examples} surface examples "
                       f">= {MIN_TRAIN_ACC:g}, else inconclusive")
    verdict["gate_passed"] = passed
    criterion_met = bool(deep_noskip > RATIO_FACTOR * deep_skip and deep_noskip > shallow_noskip)
    verdict["criterion_met"] = criterion_met
    verdict["claim_reproduced"] = criterion_met if passed else None
    if not passed:
        verdict["reason"] = reason
    summary = {
        "experiment": NAME, "claim": CLAIM,
        "paper": "Li, Xu, Taylor, Studer, Goldstein 2018, Visualizing the Loss Landscape of Neural Nets, NeurIPS",
        "method": ("filter-normalised random 2-D plane (seed 123, BN/bias unperturbed) through the trained weights; "
                   "surface and convexity map by lossatlas.api.surface(convexity=True): Lanczos λ_max and λ_min of "
                   "the Hessian (eval mode) at every cstride-th grid point of the plane (lossatlas.probes.convexity)"),
        "settings": {**vars(args), "depths_blocks": depths, "data": f"sklearn digits 8×8, standardized, train split, resized to {args.image_size}×{args.image_size}"},
        "ours": ours, "verdict": verdict, "figures": files, "elapsed_s": time.time() - t0,
        "reproduce": ("OMP_NUM_THREADS=1 .venv/bin/python experiments/skip_connections.py "
                      + ("--larger" if args.larger else "--large" if args.large else "--quick")),
    }
    write_summary(out, summary)
    return summary


if __name__ == "__main__":
    s = main()
    print(json.dumps({"experiment": NAME, "verdict": s["verdict"], "elapsed_s": round(s["elapsed_s"], 1)}))
