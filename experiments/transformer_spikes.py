"""Attention-logit growth and loss spikes in a small GPT at a high learning rate, without and with
qk-layernorm (Wortsman et al. 2023, arXiv 2309.14322), diagnosed by
``lossatlas.analysis.diagnose``.

Claim: at a high learning rate the max attention logit z = ⟨q, k⟩/√d_h of a Transformer without
qk-layernorm grows by orders of magnitude (attention entropy collapse) and the loss spikes or
diverges; with qk-layernorm the logits stay bounded and training is stable.

Setup: the reference GPT (2 layers, n_embd 64, 4 heads, block 32, vocab 64) on the synthetic
``token_stream`` (512 sequences), AdamW β = (0.9, 0.95), no weight decay, global gradient clipping at
1.0 (as in Wortsman et al.), batch 32, a linear warm-up over 250 steps to the peak LR, then constant,
500 steps, trained by ``lossatlas.train`` with ``TrainConfig(instability=True)`` (per-step
attention-logit, output-logit, activation and Adam statistics), once plain and once with
``qk_layernorm=True``, same seed, at each LR of a sweep (Wortsman et al. plot final loss against LR for
both). The showcase LR (0.15: the plain run spikes, the qk-layernorm run does not) gets ``diagnose``'s
report and the figure. LR sensitivity (Wortsman et al. 2023): LRS = mean over the sweep of
min(ℓ(η), ℓ₀) − min_η ℓ(η), ℓ(η) the final loss (mean of the last 20 steps), ℓ₀ the initial loss.

    .venv/bin/python experiments/transformer_spikes.py [--quick] [--lr 0.15] [--lrs 0.03,0.1,0.15,0.3]
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
CLAIM = ("Wortsman et al. 2023: at high LR, without qk-layernorm the max attention logit grows "
         "and the loss spikes or diverges; with qk-layernorm it does not, and the final loss is less sensitive to "
         "the LR. diagnose should name attention-logit growth as the first precursor of the plain run's spike")
# "bounded": with qk-layernorm the normalised q, k have norm √d_h, so |z| ≤ √d_h·max|gain|²: 4 at init, well below 100
LOGIT_BOUND = 100.0


def config(qk: bool, lr: float, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(model={"name": "gpt", "kwargs": {**GPT, "qk_layernorm": qk}}, data=DATA, loss="cross_entropy",
                       optimizer="adamw", lr=lr, betas=(0.9, 0.95), weight_decay=0.0, schedule="constant",
                       warmup=args.warmup, batch_size=args.batch, steps=args.steps, checkpoint_every=100,
                       grad_clip=args.clip, instability=True, seed=args.seed)


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
        "final_loss_last20": float(loss[finite][-20:].mean()), "initial_loss": float(loss[finite][0]),
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


def figure(out: Path, runs: dict[str, Path], spikes: dict[str, list], sweep: dict, lr: float) -> list[str]:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    for i, (label, path) in enumerate(runs.items()):
        log = RunReader(path).log()
        axes[0].plot(log["step"], log["loss"], color=f"C{i}", lw=0.8, label=label)
        for s in spikes[label]:
            if s is not None:
                axes[0].axvline(s, color=f"C{i}", ls=":", lw=0.8)
        for j, k in enumerate(sorted(k for k in log if k.startswith("attn_logit_max/"))):
            axes[1].semilogy(log["step"], log[k], color=f"C{i}", ls=("-", "--", "-.", ":")[j % 4], lw=0.8,
                             label=f"{label}: {k.split('/', 1)[1]}")
    axes[0].set(xlabel="step", ylabel="train loss (CE)", title=f"loss at lr {lr:g} (dotted: detected spikes)")
    axes[1].set(xlabel="step", ylabel="max attention logit", title="attention-logit growth")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6)
    sweep_figure(axes[2], sweep)
    fig.tight_layout()
    return save_figure(fig, out, NAME)


def lr_sensitivity(final: list[float], initial: float) -> float:
    """LRS = mean_η [min(ℓ(η), ℓ₀) − ℓ*], ℓ* = min_η ℓ(η) over the sweep (Wortsman et al. 2023)."""
    capped = np.minimum(np.asarray(final, dtype=np.float64), initial)
    capped[~np.isfinite(capped)] = initial  # a diverged run counts as the initial loss
    return float(np.mean(capped - capped.min()))


def sweep_figure(ax, sweep: dict) -> None:
    for i, (label, rows) in enumerate(sweep.items()):
        lrs = [r["lr"] for r in rows]
        ax.semilogx(lrs, [r["final_loss_last20"] for r in rows], "o-", color=f"C{i}", label=label)
        for r in rows:
            ax.annotate(str(r["n_spikes"]), (r["lr"], r["final_loss_last20"]), textcoords="offset points",
                        xytext=(3, 4 if i == 0 else -10), fontsize=7, color=f"C{i}")
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs], minor=False)
    ax.set_xticks([], minor=True)
    ax.set(xlabel="peak learning rate", ylabel="final loss (last 20 steps)", title="LR sweep (numbers: spikes)")
    ax.legend(fontsize=7)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder (default experiments/results/transformer_spikes)")
    ap.add_argument("--lr", type=float, default=0.15, help="the showcase LR (diagnosed and plotted)")
    ap.add_argument("--lrs", default="0.03,0.1,0.15,0.3", help="the LR sweep (comma-separated; includes --lr)")
    ap.add_argument("--warmup", type=int, default=250)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clipping (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="the showcase LR only (≈1 min instead of ≈4)")
    args = ap.parse_args(argv)
    lrs = [args.lr] if args.quick else sorted({float(v) for v in args.lrs.split(",")} | {args.lr})
    args.clip = args.clip or None
    setup_threads()
    out = out_dir(NAME, args.out)
    t0 = time.time()
    runs, ours, texts = {}, {}, {}
    sweep: dict[str, list] = {"plain": [], "qk_layernorm": []}
    for lr in lrs:
        for qk in (False, True):
            label = "qk_layernorm" if qk else "plain"
            path = out / (f"run_{label}.h5" if lr == args.lr else f"run_{label}_lr{lr:g}.h5")
            t1 = time.time()
            train(config(qk, lr, args), str(path), overwrite=True)
            res = analyse(path, args.warmup)
            res["train_s"] = time.time() - t1
            row = {k: res[k] for k in ("final_loss_last20", "min_loss", "attn_logit_max", "n_spikes", "diverged",
                                       "first_spike_cause")}
            if res["diverged"]:
                row["final_loss_last20"] = float("inf")  # LRS counts a diverged run at the initial loss
            sweep[label].append({"lr": lr, **row})
            if lr == args.lr:
                runs[label], ours[label] = path, res
                texts[label] = render_text(diagnose(path))
            print(json.dumps({label: {"lr": lr, **{k: res[k] for k in ("final_loss", "attn_logit_max", "n_spikes",
                                                                          "diverged", "first_spike_cause")}}}),
                  file=sys.stderr, flush=True)
    files = figure(out, runs, {k: v["spike_starts"] for k, v in ours.items()}, sweep, args.lr)
    (out / "diagnose.txt").write_text("\n\n".join(f"== {k} (lr {args.lr:g}) ==\n{v}" for k, v in texts.items()) + "\n")
    plain, qk = ours["plain"], ours["qk_layernorm"]
    initial = plain["initial_loss"]
    lrs_plain = lr_sensitivity([r["final_loss_last20"] for r in sweep["plain"]], initial)
    lrs_qk = lr_sensitivity([r["final_loss_last20"] for r in sweep["qk_layernorm"]], initial)
    plain_spiked = plain["n_spikes"] > 0 or plain["diverged"]
    qk_stable = qk["n_spikes"] == 0 and not qk["diverged"]
    ratio = plain["attn_logit_max"] / qk["attn_logit_max"]
    verdict = {
        "lr": args.lr, "attn_logit_max_plain": plain["attn_logit_max"], "attn_logit_max_qk_layernorm": qk["attn_logit_max"],
        "attn_logit_ratio_plain_over_qk": ratio,
        "plain_spiked_or_diverged": plain_spiked, "qk_layernorm_stable": qk_stable,
        "qk_layernorm_logits_bounded": qk["attn_logit_max"] < LOGIT_BOUND,
        "final_loss_plain": plain["final_loss_last20"], "final_loss_qk_layernorm": qk["final_loss_last20"],
        "diagnose_names_attention_first": plain["first_spike_names_attention_first"],
        "diagnose_first_cause": plain["first_spike_cause"],
        "lr_sensitivity_plain": lrs_plain if len(lrs) > 1 else None,
        "lr_sensitivity_qk_layernorm": lrs_qk if len(lrs) > 1 else None,
        "sweep_lrs": lrs,
        "qk_layernorm_spike_free_lrs": [r["lr"] for r in sweep["qk_layernorm"] if r["n_spikes"] == 0 and not r["diverged"]],
        "plain_spiking_lrs": [r["lr"] for r in sweep["plain"] if r["n_spikes"] > 0 or r["diverged"]],
    }
    verdict["claim_reproduced"] = bool(
        plain_spiked and qk_stable and verdict["qk_layernorm_logits_bounded"] and ratio > 100
        and verdict["diagnose_names_attention_first"] and (len(lrs) == 1 or lrs_qk < lrs_plain))
    verdict["criterion"] = (f"at lr {args.lr:g}: the plain run spikes or diverges, the qk-layernorm run has no spike and "
                            f"max attention logit < {LOGIT_BOUND:g}, the plain run's max logit is > 100× that, diagnose "
                            "names attention-logit growth first; over the sweep, LRS(qk-layernorm) < LRS(plain)")
    summary = {
        "experiment": NAME, "claim": CLAIM, "paper": "Wortsman et al. 2023, arXiv 2309.14322",
        "settings": {**vars(args), "model": GPT, "data": DATA, "optimizer": "adamw β=(0.9, 0.95), wd 0",
                     "schedule": "linear warm-up then constant"},
        "ours": {**ours, "sweep": sweep}, "verdict": verdict,
        "figures": files + ["diagnose.txt"], "elapsed_s": time.time() - t0,
        "reproduce": "OMP_NUM_THREADS=1 .venv/bin/python experiments/transformer_spikes.py",
    }
    write_summary(out, summary)
    return summary


if __name__ == "__main__":
    s = main()
    print(json.dumps({"experiment": NAME, "verdict": s["verdict"], "elapsed_s": round(s["elapsed_s"], 1)}))
