"""Attention-logit growth and loss spikes in a small GPT at a high learning rate, without and with
qk-layernorm (Wortsman et al. 2023; SCIENCE.md §8.1), diagnosed by ``lossatlas.analysis.diagnose``.

Trains the reference GPT on the ``token_stream`` data with AdamW at a high peak LR (linear warm-up),
recording instability telemetry (``lossatlas.telemetry.InstabilityMonitor``) through the Recorder,
then runs ``diagnose`` on both runs and measures the monitor's overhead per step.

    .venv/bin/python experiments/transformer_spikes.py [--lr 0.03] [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lossatlas import models
from lossatlas.analysis.diagnose import diagnose
from lossatlas.probes.losses import batch_loss
from lossatlas.recorder import Recorder
from lossatlas.store import RunReader
from lossatlas.telemetry import InstabilityMonitor

GPT = {"vocab_size": 64, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 64}
DATA = {"name": "token_stream", "kwargs": {"n_sequences": 512}}


def train(path, *, qk_layernorm, lr, steps, warmup, batch, seed=0, monitor=True):
    torch.manual_seed(seed)
    spec = {"name": "gpt", "kwargs": {**GPT, "qk_layernorm": qk_layernorm}}
    model = models.build_model(spec)
    x, y = models.build_data(DATA)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    mon = InstabilityMonitor(model, opt) if monitor else None
    gen = torch.Generator().manual_seed(seed)
    times = []
    with Recorder(str(path), model, opt, model_spec=spec, data_spec=DATA, loss="cross_entropy",
                  checkpoint_every=100, overwrite=True) as rec:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, step / warmup)
            idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
            loss = batch_loss("cross_entropy", model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            extra = mon.collect() if mon else {}
            times.append(time.perf_counter() - t0)
            rec.step(step, loss=loss.item(), **extra)
            if not np.isfinite(loss.item()):
                break
    if mon:
        mon.close()
    return float(np.median(times[10:]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/out/transformer_spikes")
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    t0 = time.time()
    results = {}
    for qk in (False, True):
        path = out / f"run_qk{int(qk)}.h5"
        step_s = train(path, qk_layernorm=qk, lr=args.lr, steps=args.steps, warmup=args.warmup, batch=args.batch)
        log = RunReader(path).log()
        d = diagnose(path)
        attn = {k: float(np.nanmax(v)) for k, v in log.items() if k.startswith("attn_logit_max/")}
        results["qk_layernorm" if qk else "plain"] = {
            "final_loss": float(log["loss"][np.isfinite(log["loss"])][-1]),
            "max_loss_after_warmup": float(np.nanmax(log["loss"][args.warmup:])),
            "attn_logit_max": attn, "n_spikes": len(d.spikes), "diverged": d.diverged,
            "causes": [s.cause for s in d.spikes],
            "first_precursor": [s.precursors[0].signal if s.precursors else None for s in d.spikes],
            "summary": d.summary, "median_step_s": step_s}
        print(json.dumps(results["qk_layernorm" if qk else "plain"]))
    # overhead of the monitor: same training without it
    plain_s = train(out / "overhead.h5", qk_layernorm=False, lr=1e-3, steps=120, warmup=10, batch=args.batch, monitor=False)
    mon_s = train(out / "overhead.h5", qk_layernorm=False, lr=1e-3, steps=120, warmup=10, batch=args.batch, monitor=True)
    overhead = {"step_s_without": plain_s, "step_s_with": mon_s, "overhead_pct": 100 * (mon_s / plain_s - 1),
                "device": "cpu (2 threads)"}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for qk, ls in ((False, "-"), (True, "--")):
        log = RunReader(out / f"run_qk{int(qk)}.h5").log()
        axes[0].semilogy(log["step"], log["loss"], ls, label=f"qk-layernorm={qk}")
        for k in sorted(k for k in log if k.startswith("attn_logit_max/")):
            axes[1].semilogy(log["step"], log[k], ls, label=f"{k} (qk={qk})")
    axes[0].set(xlabel="step", ylabel="train loss")
    axes[1].set(xlabel="step", ylabel="max attention logit")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "transformer_spikes.png", dpi=120)
    summary = {"experiment": "transformer_spikes", "settings": vars(args),
               "claim": "Wortsman et al. 2023: without qk-layernorm attention logits grow and the loss spikes/diverges at "
                        "high LR; with qk-layernorm it does not; diagnose should name attention-logit growth first",
               "ours": results, "monitor_overhead": overhead, "elapsed_s": time.time() - t0}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(overhead))


if __name__ == "__main__":
    main()
