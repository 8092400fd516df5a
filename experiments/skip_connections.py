"""Skip connections and chaotic landscapes: filter-normalised surfaces and the convexity map of ResNets with and
without shortcuts at two depths (Li, Xu, Taylor, Studer, Goldstein 2018, "Visualizing the Loss Landscape of
Neural Nets", NeurIPS 2018).

Claim: without skip connections the loss landscape turns chaotic (strongly non-convex) as the network gets
deeper, while the ResNet with shortcuts stays smooth and nearly convex. Li et al. show it with filter-normalised
2-D surfaces and with the map of |λ_min/λ_max| of the Hessian over the plane: near 0 where the landscape is
locally convex, large where it has strong negative curvature.

Setup: the registry's ``resnet`` (stages of widths ``--widths``, ``b`` BasicBlocks per stage, so depth
2 + 2·b·stages counting the stem and the classifier; ``skip=False`` is Li et al.'s no-short variant) on
scikit-learn's 8×8 digits (train split), trained by SGD (momentum 0.9, batch 128, constant LR) for ``--steps``
steps, once with and once without shortcuts at each of two depths, same seed. Then in eval mode (BatchNorm with
its running statistics):

- the surface L(θ + α d_x + β d_y) on a ``--grid``² grid of [−1, 1]² (``lossatlas.api.surface``, random
  filter-normalised directions, seed 123, BatchNorm and biases left unperturbed), on ``--n-examples`` examples;
- the convexity map: at every point of a coarser ``--cgrid``² grid of the same plane, λ_max (Lanczos "LA") and
  λ_min (Lanczos "SA") of the Hessian of the loss (``HessianOperator``, ``lanczos_eigs`` with ``--iters``
  iterations, tolerance 1e-2) and the ratio r = |λ_min/λ_max|.

Criterion (fixed before the run): the mean of r over the convexity grid of the deep no-skip network is more
than twice that of the deep skip network (``RATIO_FACTOR``), and larger than the shallow no-skip network's
(non-convexity grows with depth without shortcuts).

    .venv/bin/python experiments/skip_connections.py [--quick]
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
from lossatlas.curvature.hessian import HessianOperator  # noqa: E402
from lossatlas.estimators.lanczos import lanczos_eigs  # noqa: E402
from lossatlas.models import build_data, build_model  # noqa: E402

NAME = "skip_connections"
CLAIM = ("Li et al. 2018: without skip connections the loss landscape becomes chaotic and non-convex as depth grows "
         "(large |λ_min/λ_max| over the filter-normalised plane), while ResNets with shortcuts stay smooth and nearly "
         "convex")
RATIO_FACTOR = 2.0  # deep no-skip mean |λ_min/λ_max| must exceed this multiple of deep skip's


def train_model(depth_blocks: int, skip: bool, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> torch.nn.Module:
    """A resnet with ``depth_blocks`` blocks per stage trained by SGD with momentum; returned in eval mode."""
    torch.manual_seed(args.seed)
    model = build_model({"name": "resnet", "kwargs": {"widths": args.widths, "blocks_per_stage": depth_blocks,
                                                       "skip": skip}})
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for _ in range(args.steps):
        idx = torch.randint(0, x.shape[0], (args.batch,), generator=gen)  # a mini-batch drawn with replacement
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def convexity_map(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor], res, coords: np.ndarray,
                  iters: int) -> dict:
    """λ_max, λ_min and |λ_min/λ_max| of the Hessian at θ + α d_x + β d_y for α, β on ``coords`` (eval mode)."""
    names, shapes = res.meta["param_names"], res.meta["param_shapes"]
    params = dict(model.named_parameters())
    base = {k: params[k].detach().clone() for k in names}
    dx, dy = (np.asarray(res.values[k], dtype=np.float64) for k in ("direction_x", "direction_y"))

    def unflat(flat: np.ndarray) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for k, s in zip(names, shapes):
            n = int(np.prod(s))
            out[k] = torch.as_tensor(flat[i:i + n], dtype=base[k].dtype).reshape(s)
            i += n
        return out

    ux, uy = unflat(dx), unflat(dy)
    n = len(coords)
    lam_max, lam_min = np.full((n, n), np.nan), np.full((n, n), np.nan)
    try:
        for i, beta in enumerate(coords):
            for j, alpha in enumerate(coords):
                with torch.no_grad():
                    for k in names:  # θ(α, β) = θ* + α d_x + β d_y
                        params[k].copy_(base[k] + float(alpha) * ux[k] + float(beta) * uy[k])
                op = HessianOperator(model, [data], "cross_entropy", mode="eval", check_deterministic=False)
                hi = lanczos_eigs(op, 1, which="LA", max_iter=iters, tol=1e-2, return_eigenvectors=False)
                lo = lanczos_eigs(op, 1, which="SA", max_iter=iters, tol=1e-2, return_eigenvectors=False)
                lam_max[i, j], lam_min[i, j] = float(hi.eigenvalues[0]), float(lo.eigenvalues[0])
    finally:
        with torch.no_grad():
            for k in names:  # back to θ*
                params[k].copy_(base[k])
    ratio = np.abs(lam_min / lam_max)
    return {"lambda_max": lam_max, "lambda_min": lam_min, "ratio": ratio, "coords": coords,
            "mean_ratio": float(np.nanmean(ratio)), "median_ratio": float(np.nanmedian(ratio)),
            "max_ratio": float(np.nanmax(ratio)), "frac_ratio_above_0.1": float(np.nanmean(ratio > 0.1))}


def roughness(loss: np.ndarray) -> float:
    """Mean |discrete Laplacian| of log L over the interior of the grid: 0 for a plane, large for a chaotic surface."""
    z = np.log(np.maximum(loss, 1e-12))
    lap = z[1:-1, :-2] + z[1:-1, 2:] + z[:-2, 1:-1] + z[2:, 1:-1] - 4 * z[1:-1, 1:-1]
    return float(np.mean(np.abs(lap)))


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
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--n-examples", type=int, default=256, help="examples for the surface and the Hessians")
    ap.add_argument("--grid", type=int, default=21, help="surface grid points per axis on [-1, 1]")
    ap.add_argument("--cgrid", type=int, default=5, help="convexity-map grid points per axis on [-1, 1]")
    ap.add_argument("--iters", type=int, default=10, help="Lanczos iterations per eigenvalue")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="15×15 surface, 128 examples, 8 Lanczos steps")
    args = ap.parse_args(argv)
    args.widths = [int(w) for w in args.widths.split(",")]
    depths = [int(b) for b in args.depths.split(",")]
    if args.quick:  # a coarser surface, fewer examples and Lanczos steps: ≈4 min on one core
        args.grid, args.n_examples, args.iters = min(args.grid, 15), min(args.n_examples, 128), min(args.iters, 8)
    setup_threads()
    out = out_dir(NAME, args.out)
    t0 = time.time()
    x, y = build_data({"name": "digits"})
    data = (x[: args.n_examples], y[: args.n_examples])
    coords = np.linspace(-1.0, 1.0, args.cgrid)
    rows, ours = {}, {}
    for b in depths:
        depth = 2 + 2 * b * len(args.widths)
        for skip in (True, False):
            label = f"{'resnet' if skip else 'noshort'}-{depth}"
            t1 = time.time()
            model = train_model(b, skip, x, y, args)
            with torch.no_grad():
                acc = float((model(x).argmax(1) == y).float().mean())
            res = surface(model, data, xrange=(-1.0, 1.0, args.grid), batch_size=None)
            loss = np.asarray(res.values["loss"], dtype=np.float64)
            cv = convexity_map(model, data, res, coords, args.iters)
            rows[label] = {"surface_loss": loss, "convexity": cv}
            ours[label] = {"depth": depth, "skip": skip, "blocks_per_stage": b, "train_accuracy": acc,
                           "loss_at_center": float(loss[args.grid // 2, args.grid // 2]),
                           "surface_roughness": roughness(loss), "surface_loss_max": float(loss.max()),
                           **{k: cv[k] for k in ("mean_ratio", "median_ratio", "max_ratio", "frac_ratio_above_0.1")},
                           "lambda_max_center": float(cv["lambda_max"][len(coords) // 2, len(coords) // 2]),
                           "ratio_map": cv["ratio"], "lambda_max_map": cv["lambda_max"],
                           "lambda_min_map": cv["lambda_min"], "elapsed_s": time.time() - t1}
            print(json.dumps({label: {k: ours[label][k] for k in ("train_accuracy", "mean_ratio", "surface_roughness",
                                                                  "elapsed_s")}}), file=sys.stderr, flush=True)
    files = figure(out, rows, np.linspace(-1.0, 1.0, args.grid))
    shallow, deep = 2 + 2 * depths[0] * len(args.widths), 2 + 2 * depths[-1] * len(args.widths)
    m = {k: v["mean_ratio"] for k, v in ours.items()}
    deep_noskip, deep_skip = m[f"noshort-{deep}"], m[f"resnet-{deep}"]
    shallow_noskip = m[f"noshort-{shallow}"]
    verdict = {
        "mean_ratio": m, "deep_noskip_over_deep_skip": deep_noskip / deep_skip if deep_skip > 0 else float("inf"),
        "deep_noskip_over_shallow_noskip": deep_noskip / shallow_noskip if shallow_noskip > 0 else float("inf"),
        "criterion": (f"mean |λ_min/λ_max| over the {args.cgrid}×{args.cgrid} grid: noshort-{deep} > "
                      f"{RATIO_FACTOR:g}× resnet-{deep}, and noshort-{deep} > noshort-{shallow}"),
    }
    verdict["claim_reproduced"] = bool(deep_noskip > RATIO_FACTOR * deep_skip and deep_noskip > shallow_noskip)
    summary = {
        "experiment": NAME, "claim": CLAIM,
        "paper": "Li, Xu, Taylor, Studer, Goldstein 2018, Visualizing the Loss Landscape of Neural Nets, NeurIPS",
        "method": ("filter-normalised random 2-D plane (seed 123, BN/bias unperturbed) through the trained weights; "
                   "surface by lossatlas.api.surface; convexity map: Lanczos λ_max ('LA') and λ_min ('SA') of the "
                   "Hessian (HessianOperator, eval mode) at every point of a coarse grid of the plane"),
        "settings": {**vars(args), "depths_blocks": depths, "data": "sklearn digits 8×8, standardized, train split"},
        "ours": ours, "verdict": verdict, "figures": files, "elapsed_s": time.time() - t0,
        "reproduce": "OMP_NUM_THREADS=1 .venv/bin/python experiments/skip_connections.py --quick",
    }
    write_summary(out, summary)
    return summary


if __name__ == "__main__":
    s = main()
    print(json.dumps({"experiment": NAME, "verdict": s["verdict"], "elapsed_s": round(s["elapsed_s"], 1)}))
