"""Attention-logit growth and loss spikes in a small GPT at a high learning rate, without and with
qk-layernorm (Wortsman et al. 2023, arXiv 2309.14322; SCIENCE.md §8.1), diagnosed by
``lossatlas.analysis.diagnose``.

Claim: at a high learning rate the max attention logit z = ⟨q, k⟩/√d_h of a Transformer without
qk-layernorm grows by orders of magnitude (attention entropy collapse) and the loss spikes or
diverges; with qk-layernorm the logits stay bounded and training is stable.

Setup: the reference GPT (2 layers, n_embd 64, 4 heads, block 32, vocab 64) on the synthetic
``token_stream`` (512 sequences), AdamW β = (0.9, 0.95), no weight decay, batch 32, peak LR 0.2
reached by a linear warm-up over 250 steps (the loss first falls at small LR, then the spike comes as
the LR rises), trained by ``lossatlas.train`` with ``TrainConfig(instability=True)`` (per-step
attention-logit, output-logit, activation and Adam statistics), once plain and once with
``qk_layernorm=True``, same seed. Then ``diagnose`` on both runs.

    .venv/bin/python experiments/transformer_spikes.py [--quick] [--lr 0.2] [--warmup 250] [--steps 500]
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

from lossatlas.analysis.diagnose import diagnose, render_text  # noqa: E402
from lossatlas.store import RunReader  # noqa: E402
from lossatlas.train import TrainConfig, train  # noqa: E402

NAME = "transformer_spikes"
GPT = {"vocab_size": 64, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 64}
DATA = {"name": "token_stream", "kwargs": {"vocab_size": 64, "block_size": 32, "n_sequences": 512}}
CLAIM = ("Wortsman et al. 2023 (SCIENCE.md §8.1): at high LR, without qk-layernorm the max attention logit grows "
         "and the loss spikes or diverges; with qk-layernorm it does not. diagnose should name attention-logit "
         "growth as the first precursor of the plain run's spike")


def config(qk: bool, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(model={"name": "gpt", "kwargs": {**GPT, "qk_layernorm": qk}}, data=DATA, loss="cross_entropy",
                       optimizer="adamw", lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, schedule="constant",
                       warmup=args.warmup, batch_size=args.batch, steps=args.steps, checkpoint_every=100,
                       instability=True, seed=args.seed)


def analyse(path: Path, warmup: int) -> dict:
    """The numbers of one run: attention logits, loss, spikes and the diagnosis."""
    log = RunReader(path).log()
    steps, loss = np.asarray(log["step"]), np.asarray(log["loss"], dtype=np.float64)
    finite = np.isfinite(loss)
    attn = {k.split("/", 1)[1]: float(np.nanmax(v)) for k, v in log.items() if k.startswith("attn_logit_max/")}
    d = diagnose(path)
    first = d.spikes[0] if d.spikes else None
    attn_rank = None
    if first is not None:
        names = [p.signal for p in first.precursors]
        attn_rank = next((i + 1 for i, n in enumerate(names) if n.startswith("attn_logit_max/")), None)
    return {
        "final_loss": float(loss[finite][-1]), "min_loss": float(loss[finite].min()),
        "max_loss_after_step_50": float(np.nanmax(loss[steps > 50])),
        "attn_logit_max_per_layer": attn, "attn_logit_max": max(attn.values()) if attn else None,
        "n_spikes": sum(s.spike.get("kind") != "divergence" for s in d.spikes), "diverged": d.diverged,
        "spike_starts": [s.spike.get("start") for s in d.spikes],
        "spike_causes": [s.cause for s in d.spikes],
        "first_spike_precursors": [{"signal": p.signal, "lead_steps": p.lead_steps, "z": p.zscore}
                                   for p in (first.precursors[:6] if first else [])],
        "first_spike_cause": first.cause if first else None,
        "first_spike_names_attention_first": bool(first is not None and first.cause == "attention_logit_growth"),
        "first_spike_attention_precursor_rank": attn_rank,
        "diagnose_summary": d.summary,
        "run": path.name,
    }


def figure(out: Path, runs: dict[str, Path], spikes: dict[str, list]) -> list[str]:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.6))
    for i, (label, path) in enumerate(runs.items()):
        log = RunReader(path).log()
        axes[0].plot(log["step"], log["loss"], color=f"C{i}", lw=0.8, label=label)
        for s in spikes[label]:
            if s is not None:
                axes[0].axvline(s, color=f"C{i}", ls=":", lw=0.8)
        for j, k in enumerate(sorted(k for k in log if k.startswith("attn_logit_max/"))):
            axes[1].semilogy(log["step"], log[k], color=f"C{i}", ls=("-", "--", "-.", ":")[j % 4], lw=0.8,
                             label=f"{label}: {k.split('/', 1)[1]}")
    axes[0].set(xlabel="step", ylabel="train loss (CE)", title="loss (dotted: detected spikes)")
    axes[1].set(xlabel="step", ylabel="max attention logit", title="attention-logit growth")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, out, NAME)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder (default experiments/results/transformer_spikes)")
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--warmup", type=int, default=250)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="accepted for run_all/tests; the default run (≈1.5 min) is already the short one")
    args = ap.parse_args(argv)
    setup_threads()
    out = out_dir(NAME, args.out)
    t0 = time.time()
    runs, ours, texts = {}, {}, {}
    for qk in (False, True):
        label = "qk_layernorm" if qk else "plain"
        path = out / f"run_{label}.h5"
        t1 = time.time()
        train(config(qk, args), str(path), overwrite=True)
        runs[label] = path
        ours[label] = analyse(path, args.warmup)
        ours[label]["train_s"] = time.time() - t1
        texts[label] = render_text(diagnose(path))
        print(json.dumps({label: {k: ours[label][k] for k in ("final_loss", "attn_logit_max", "n_spikes",
                                                             "diverged", "first_spike_cause")}}),
              file=sys.stderr, flush=True)
    files = figure(out, runs, {k: v["spike_starts"] for k, v in ours.items()})
    (out / "diagnose.txt").write_text("\n\n".join(f"== {k} ==\n{v}" for k, v in texts.items()) + "\n")
    plain, qk = ours["plain"], ours["qk_layernorm"]
    summary = {
        "experiment": NAME, "claim": CLAIM, "paper": "Wortsman et al. 2023, arXiv 2309.14322",
        "settings": {**vars(args), "model": GPT, "data": DATA, "optimizer": "adamw β=(0.9, 0.95), wd 0",
                     "schedule": "linear warm-up then constant"},
        "ours": ours,
        "verdict": {
            "attn_logit_ratio_plain_over_qk": plain["attn_logit_max"] / qk["attn_logit_max"],
            "plain_spiked_or_diverged": plain["n_spikes"] > 0 or plain["diverged"],
            "qk_layernorm_stable": qk["n_spikes"] == 0 and not qk["diverged"],
            "final_loss_plain": plain["final_loss"], "final_loss_qk_layernorm": qk["final_loss"],
            "diagnose_names_attention_first": plain["first_spike_names_attention_first"],
            "diagnose_first_cause": plain["first_spike_cause"],
        },
        "figures": files + ["diagnose.txt"], "elapsed_s": time.time() - t0,
        "reproduce": "OMP_NUM_THREADS=1 .venv/bin/python experiments/transformer_spikes.py",
    }
    write_summary(out, summary)
    return summary


if __name__ == "__main__":
    s = main()
    print(json.dumps({"experiment": NAME, "verdict": s["verdict"], "elapsed_s": round(s["elapsed_s"], 1)}))
