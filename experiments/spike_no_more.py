"""Spike No More: a small GPT pre-trained at an aggressive learning rate with and without the stability conditions
of Takase, Kiyono, Kobayashi, Suzuki 2023 ("Spike No More: Stabilizing the Pre-training of Large Language Models",
arXiv 2312.16903), diagnosed by ``lossatlas.analysis.diagnose``.

Claim: pre-LN Transformer pre-training spikes when the embeddings entering the first block have a standard
deviation far below 1 (std 0.02, the usual init), because the gradients of the sub-layers then grow without
bound; with small sub-layer parameters (std √(2/(5d))) and embeddings of std ≈ 1 (Scaled Embed: E·√d) the
gradient norm stays bounded and the loss does not spike.

Setup: the reference GPT (2 layers, n_embd d = 64, 4 heads, block 32, vocab 64) on the synthetic ``token_stream``
(512 sequences), AdamW β = (0.9, 0.95), no weight decay, no gradient clipping, batch 32, a linear warm-up over
``--warmup`` steps to ``--lr`` (0.1: aggressive for this model), then constant, ``--steps`` steps, trained by
``lossatlas.train`` with ``TrainConfig(instability=True)``; "vanilla" = every weight N(0, 0.02) (std(x₀) ≈ 0.03),
"scaled_embed" = ``scaled_embed=True, emb_std = init_std = √(2/(5d))`` (std(x₀) ≈ √(2/5)·√2 ≈ 0.9), same seed.

Criterion (fixed before the run): the vanilla run has ≥ 1 loss spike or diverges, the scaled-embed run has none;
the vanilla run's maximum gradient norm is more than ``GRAD_FACTOR`` (2×) the scaled run's; and ``diagnose``
names the violated embedding condition ("embedding_std") at the checkpoint before the vanilla run's first spike.

    .venv/bin/python experiments/spike_no_more.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import out_dir, pyplot, save_figure, setup_threads, write_summary  # noqa: E402

from lossatlas.analysis.diagnose import diagnose, render_text, spike_no_more_condition  # noqa: E402
from lossatlas.store import RunReader  # noqa: E402
from lossatlas.train import TrainConfig, train  # noqa: E402

NAME = "spike_no_more"
GPT = {"vocab_size": 64, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 64}
DATA = {"name": "token_stream", "kwargs": {"vocab_size": 64, "block_size": 32, "n_sequences": 512}}
CLAIM = ("Takase et al. 2023: with embeddings of std ≪ 1 the pre-training of a pre-LN Transformer shows loss spikes "
         "and gradient-norm growth at an aggressive LR; small sub-layer init plus embeddings of std ≈ 1 (Scaled Embed) "
         "remove them. diagnose should name the violated embedding condition")
GRAD_FACTOR = 2.0  # vanilla max grad norm must exceed this multiple of the scaled run's


def variants(d: int) -> dict[str, dict]:
    """The two GPT variants: nanoGPT's init, and Scaled Embed with the small init √(2/(5d))."""
    small = math.sqrt(2.0 / (5.0 * d))
    return {"vanilla": {}, "scaled_embed": {"scaled_embed": True, "emb_std": small, "init_std": small}}


def config(extra: dict, args: argparse.Namespace) -> TrainConfig:
    model = {**GPT, "n_embd": args.n_embd, "n_layer": args.n_layer, **extra}
    return TrainConfig(model={"name": "gpt", "kwargs": model}, data=DATA, loss="cross_entropy", optimizer="adamw",
                       lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, schedule="constant", warmup=args.warmup,
                       batch_size=args.batch, steps=args.steps, checkpoint_every=args.checkpoint_every, grad_clip=None,
                       instability=True, seed=args.seed)


def analyse(path: Path) -> dict:
    """Loss, gradient norm, spikes, the diagnosis and the Spike No More condition at init and at the end."""
    reader = RunReader(path)
    log = reader.log()
    loss = np.asarray(log["loss"], dtype=np.float64)
    grad = np.asarray(log["grad_norm"], dtype=np.float64)
    finite = np.isfinite(loss)
    d = diagnose(path)
    first = d.spikes[0] if d.spikes else None
    steps = reader.steps()
    kwargs = reader.model_spec.get("kwargs", {})
    cond0 = spike_no_more_condition(reader.checkpoint(steps[0]).state_dict(), kwargs)
    cond1 = spike_no_more_condition(reader.checkpoint(steps[-1]).state_dict(), kwargs)
    first_cond = first.conditions.get("spike_no_more") if first is not None else None
    return {
        "final_loss_last20": float(loss[finite][-20:].mean()), "initial_loss": float(loss[finite][0]),
        "grad_norm_max": float(np.nanmax(grad)), "grad_norm_median": float(np.nanmedian(grad)),
        "grad_norm_first": float(grad[np.isfinite(grad)][0]),
        "n_spikes": sum(s.spike.get("kind") != "divergence" for s in d.spikes), "diverged": d.diverged,
        "spike_starts": [s.spike.get("start") for s in d.spikes], "spike_causes": [s.cause for s in d.spikes],
        "first_spike_condition": first_cond, "first_spike_verdict": first.verdict if first else None,
        "condition_at_init": cond0, "condition_at_end": cond1, "diagnose_summary": d.summary, "run": path.name,
    }


def figure(out: Path, runs: dict[str, Path], spikes: dict[str, list]) -> list[str]:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (label, path) in enumerate(runs.items()):
        log = RunReader(path).log()
        axes[0].plot(log["step"], log["loss"], color=f"C{i}", lw=0.8, label=label)
        axes[1].semilogy(log["step"], log["grad_norm"], color=f"C{i}", lw=0.8, label=label)
        for s in spikes[label]:
            axes[0].axvline(s, color=f"C{i}", ls=":", lw=0.8)
    axes[0].set(xlabel="step", ylabel="train loss (CE)", title="loss (dotted: detected spikes)")
    axes[1].set(xlabel="step", ylabel="global gradient norm", title="gradient norm")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out, NAME)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder (default experiments/results/spike_no_more)")
    ap.add_argument("--lr", type=float, default=0.1, help="peak learning rate (aggressive)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="the same run (≈1.5 min on one core); kept for run_all")
    args = ap.parse_args(argv)
    setup_threads()
    out = out_dir(NAME, args.out)
    t0 = time.time()
    runs, ours, texts = {}, {}, {}
    for label, extra in variants(args.n_embd).items():
        path = out / f"run_{label}.h5"
        t1 = time.time()
        train(config(extra, args), str(path), overwrite=True)
        runs[label], ours[label] = path, {**analyse(path), "model_kwargs": extra, "train_s": time.time() - t1}
        texts[label] = render_text(diagnose(path))
        print(json.dumps({label: {k: ours[label][k] for k in ("final_loss_last20", "grad_norm_max", "n_spikes",
                                                              "diverged")}}), file=sys.stderr, flush=True)
    files = figure(out, runs, {k: v["spike_starts"] for k, v in ours.items()})
    (out / "diagnose.txt").write_text("\n\n".join(f"== {k} (lr {args.lr:g}) ==\n{v}" for k, v in texts.items()) + "\n")
    van, sc = ours["vanilla"], ours["scaled_embed"]
    vanilla_spiked = van["n_spikes"] > 0 or van["diverged"]
    scaled_stable = sc["n_spikes"] == 0 and not sc["diverged"]
    ratio = van["grad_norm_max"] / sc["grad_norm_max"]
    named = bool(van["first_spike_condition"] and "embedding_std" in van["first_spike_condition"]["violated"])
    verdict = {
        "lr": args.lr, "vanilla_spiked_or_diverged": vanilla_spiked, "scaled_embed_stable": scaled_stable,
        "n_spikes": {"vanilla": van["n_spikes"], "scaled_embed": sc["n_spikes"]},
        "grad_norm_max": {"vanilla": van["grad_norm_max"], "scaled_embed": sc["grad_norm_max"]},
        "grad_norm_ratio_vanilla_over_scaled": ratio,
        "embedding_std_at_init": {k: v["condition_at_init"]["embedding_std"] for k, v in ours.items()},
        "diagnose_names_embedding_condition": named,
        "final_loss": {"vanilla": van["final_loss_last20"], "scaled_embed": sc["final_loss_last20"]},
        "criterion": (f"at lr {args.lr:g}: vanilla has ≥ 1 spike or diverges, scaled_embed has none; max grad norm "
                      f"vanilla > {GRAD_FACTOR:g}× scaled_embed; diagnose names the embedding-std condition at the "
                      "checkpoint before vanilla's first spike"),
    }
    verdict["claim_reproduced"] = bool(vanilla_spiked and scaled_stable and ratio > GRAD_FACTOR and named)
    summary = {
        "experiment": NAME, "claim": CLAIM,
        "paper": "Takase, Kiyono, Kobayashi, Suzuki 2023, Spike No More, arXiv 2312.16903",
        "method": ("two GPTs, same seed and data, AdamW at an aggressive LR without clipping; spikes by "
                   "lossatlas.analysis.diagnose; the condition by diagnose.spike_no_more_condition on checkpoints"),
        "settings": {**vars(args), "model": GPT, "data": DATA, "variants": variants(args.n_embd)},
        "ours": ours, "verdict": verdict, "figures": files + ["diagnose.txt"], "elapsed_s": time.time() - t0,
        "reproduce": "OMP_NUM_THREADS=1 .venv/bin/python experiments/spike_no_more.py",
    }
    write_summary(out, summary)
    return summary


if __name__ == "__main__":
    s = main()
    print(json.dumps({"experiment": NAME, "verdict": s["verdict"], "elapsed_s": round(s["elapsed_s"], 1)}))
