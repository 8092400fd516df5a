"""Block heterogeneity of the Hessian: a transformer's parameter blocks have more dissimilar spectra than a CNN's.

Claim (Zhang, Chen, Ding, Li, Sun & Luo 2024, "Why Transformers Need Adam: A Hessian Perspective", NeurIPS): at
initialization the spectral densities of the Hessian's diagonal blocks differ widely between the blocks of a
transformer (embedding, Q, K, V, attention output, MLP, head) and are alike across the blocks of a CNN; their
average pairwise Jensen–Shannon divergence JS⁰ is much larger for the transformer.

Setup (CPU scale): the small GPT of ``lossatlas.models.gpt`` (2 layers, width 32, vocab 32, context 16) on 32
``token_stream`` sequences, and the small CNN of ``lossatlas.models.cnn`` (channels 8-16-16) on 256 8×8 digits,
both at initialization (seed 0). The ``block_heterogeneity`` probe computes each weight matrix's block spectrum
by SLQ (2 probes × 25 Lanczos steps, float32), smooths them on one common grid (σ = 1% of its width) and
averages the JS divergence (nats) over all pairs: JS⁰ (the weight blocks' densities are re-smoothed on their own
grid from the same Ritz values). The primary comparison uses the weight matrices (the
paper's blocks; ResNet/VGG-style CNNs have no conv biases); JS⁰ over every parameter tensor, biases and norms
included, is reported beside it.

Writes experiments/results/block_heterogeneity/{summary.json, block_heterogeneity.png/.pdf}.

    .venv/bin/python experiments/block_heterogeneity.py [--quick | --tiny]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import out_dir, pyplot, save_figure, setup_threads, write_summary  # noqa: E402

from lossatlas.batches import as_batches  # noqa: E402
from lossatlas.models import build_data, build_model  # noqa: E402
from lossatlas.probes import ProbeContext  # noqa: E402
from lossatlas.probes.block_heterogeneity import (  # noqa: E402
    BlockHeterogeneity,
    common_grid_densities,
    js0,
    js_divergence_matrix,
)

NAME = "block_heterogeneity"
CLAIM = ("the Hessian's parameter blocks have far more dissimilar spectra in a transformer than in a CNN: JS⁰(GPT) "
         "≫ JS⁰(CNN) at initialization (Zhang et al. 2024)")

CONFIGS = {
    # name: (gpt kwargs, token data kwargs, cnn channels, digits examples, SLQ probes, SLQ steps)
    "full": ({"vocab_size": 32, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32},
             {"vocab_size": 32, "block_size": 16, "n_sequences": 32}, [8, 16, 16], 256, 2, 25),
    "tiny": ({"vocab_size": 8, "block_size": 4, "n_layer": 1, "n_head": 1, "n_embd": 8},
             {"vocab_size": 8, "block_size": 4, "n_sequences": 8}, [2, 4], 32, 1, 6),
}


def weight_subset(res, pattern: str = r"weight") -> dict:
    """JS⁰ over the blocks whose name matches ``pattern``, from the stored SLQ nodes (no further products).

    The subset's densities are smoothed on their own common grid, as the probe with ``select=pattern`` does.
    """
    names = [str(b) for b in res.coords["block"]]
    keep = [i for i, n in enumerate(names) if re.search(pattern, n)]
    nodes = [res.values["block_nodes"][i] for i in keep]
    weights = [res.values["block_weights"][i] for i in keep]
    nodes = [n[:, np.isfinite(n).all(axis=0)] for n in nodes]  # drop the NaN padding of short blocks
    weights = [w[:, : n.shape[1]] for w, n in zip(weights, nodes)]
    grid, dens, _ = common_grid_densities(nodes, weights, grid_len=int(res.config["grid_len"]),
                                          sigma_squared=float(res.config["sigma_squared"]))
    js = js_divergence_matrix(dens)
    return {"names": [names[i] for i in keep], "grid": grid, "density": dens, "js": js, "js0": js0(js),
            "js0_distance": js0(np.sqrt(js))}


def measure(label: str, model, batches, *, num_probes: int, num_steps: int) -> tuple[dict, dict]:
    """JS⁰ over the weight blocks (primary) and over every block, from one run of the probe."""
    t0 = time.perf_counter()
    ctx = ProbeContext(model=model, data=batches, loss="cross_entropy", step=0)
    every = BlockHeterogeneity(num_probes=num_probes, num_steps=num_steps, seed=0).run(ctx)
    sub = weight_subset(every)
    case = {
        "label": label, "num_params": int(sum(p.numel() for p in model.parameters())),
        "js0": sub["js0"], "js0_distance": sub["js0_distance"], "num_blocks": len(sub["names"]),
        "js0_all_blocks": every.scalar("js0"), "num_blocks_all": int(every.meta["num_blocks"]),
        "blocks": sub["names"],
        "block_top_ritz": [float(np.nanmax(every.values["block_nodes"][i])) for i, n in
                           enumerate(every.coords["block"]) if str(n) in set(sub["names"])],
        "matvecs": int(every.meta["matvecs"]), "elapsed_s": time.perf_counter() - t0,
    }
    print(f"{label}: JS⁰ (weights) {case['js0']:.4f} over {case['num_blocks']} blocks, all blocks "
          f"{case['js0_all_blocks']:.4f} ({case['elapsed_s']:.0f}s)", file=sys.stderr, flush=True)
    return case, sub


def figure(results: dict, out: Path) -> list[str]:
    """Each model's block densities (log scale) and its JS matrix."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9.0, 6.6), squeeze=False)
    for j, (label, res) in enumerate(results.items()):
        grid, dens = res["grid"], res["density"]
        ax = axes[0, j]
        for i in range(dens.shape[0]):
            ax.semilogy(grid, np.maximum(dens[i], 1e-6 * dens.max()), lw=0.8, color=f"C{i % 10}")
        ax.set_title(f"{label}: {dens.shape[0]} weight blocks, JS⁰ = {res['js0']:.3f}", fontsize=9)
        ax.set_xlabel("eigenvalue λ of the block Hessian", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        im = axes[1, j].imshow(res["js"], vmin=0, vmax=np.log(2), cmap="viridis")
        axes[1, j].set_title("JS(ρ_i ‖ ρ_j), nats", fontsize=9)
        axes[1, j].set_xlabel("block", fontsize=8)
        axes[1, j].set_ylabel("block", fontsize=8)
        fig.colorbar(im, ax=axes[1, j], fraction=0.046)
    fig.suptitle("block spectra at initialization: transformer vs CNN (Zhang et al. 2024)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out, NAME)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder (default experiments/results/block_heterogeneity)")
    ap.add_argument("--quick", action="store_true", help="the CPU-scale setting (the default; kept for run_all)")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long configuration (smoke tests only)")
    args = ap.parse_args(argv)
    setup_threads()
    out = out_dir(NAME, args.out)
    config = "tiny" if args.tiny else "full"
    gpt_kw, tok_kw, channels, n_digits, probes, steps = CONFIGS[config]
    t0 = time.time()
    torch.manual_seed(0)
    gpt = build_model({"name": "gpt", "kwargs": gpt_kw})
    x, y = build_data({"name": "token_stream", "kwargs": tok_kw})
    torch.manual_seed(0)
    cnn = build_model({"name": "cnn", "kwargs": {"channels": channels}})
    xi, yi = build_data({"name": "digits"})
    cases, results = {}, {}
    cases["gpt"], results["GPT"] = measure("GPT", gpt, as_batches((x, y), 64), num_probes=probes, num_steps=steps)
    cases["cnn"], results["CNN"] = measure("CNN", cnn, as_batches((xi[:n_digits], yi[:n_digits]), 256),
                                           num_probes=probes, num_steps=steps)
    files = figure(results, out)
    ratio = cases["gpt"]["js0"] / cases["cnn"]["js0"] if cases["cnn"]["js0"] > 0 else float("inf")
    summary = {
        "experiment": NAME, "claim": CLAIM,
        "paper": "Zhang, Chen, Ding, Li, Sun, Luo 2024, Why Transformers Need Adam: A Hessian Perspective "
                 "(NeurIPS; arXiv 2402.16788)",
        "method": "block_heterogeneity probe at initialization: SLQ density of each weight block's Hessian on a common "
                  "grid (σ = 1% of its width), JS⁰ = mean pairwise JS divergence (nats); all blocks beside it",
        "settings": {"config": config, "gpt": gpt_kw, "tokens": tok_kw, "cnn_channels": channels,
                     "digits_examples": n_digits, "slq_probes": probes, "slq_steps": steps},
        "ours": cases,
        "verdict": {"js0_gpt": cases["gpt"]["js0"], "js0_cnn": cases["cnn"]["js0"], "ratio": ratio,
                    "gpt_more_heterogeneous": bool(cases["gpt"]["js0"] > cases["cnn"]["js0"]),
                    "js0_all_blocks_gpt": cases["gpt"]["js0_all_blocks"],
                    "js0_all_blocks_cnn": cases["cnn"]["js0_all_blocks"]},
        "figures": files, "elapsed_s": time.time() - t0,
        "reproduce": "OMP_NUM_THREADS=1 .venv/bin/python experiments/block_heterogeneity.py",
    }
    write_summary(out, summary)
    return summary


if __name__ == "__main__":
    s = main()
    print(json.dumps({"experiment": NAME, "verdict": s["verdict"], "elapsed_s": round(s["elapsed_s"], 1)}))
