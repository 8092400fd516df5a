"""Run every paper reproduction in sequence; one summary line each; exit 1 if any failed.

Each experiment runs in its own process (a crash or a hang cannot take the others with it) with
one torch thread and writes experiments/results/<name>/summary.json plus its figure.

    .venv/bin/python experiments/run_all.py [--quick] [--only eos_gd,transformer_spikes] [--timeout 600]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXPERIMENTS = ("hessian_outliers", "eos_gd", "transformer_spikes", "neural_collapse", "grokking",
               "block_heterogeneity", "skip_connections", "spike_no_more", "opposing_signals", "outlier_hierarchy",
               "deep_linear_collapse", "massive_activations")


def one_line(name: str, summary: dict) -> str:
    """The headline numbers of one experiment's summary.json."""
    v = summary.get("verdict", {})
    if name == "hessian_outliers":
        return (f"Hessian outliers by gap {v['hessian_gap']['counts']} (GGN {v['ggn_gap']['counts']}) "
                f"for C = {v['hessian_gap']['C']}; claim ≈ C")
    if name == "eos_gd":
        rows = ", ".join(f"η={r['eta']:g}: {r['late_ratio_mean']:.3f} [{r['late_ratio_min']:.3f}, {r['late_ratio_max']:.3f}]"
                         if r["late_ratio_mean"] is not None else f"η={r['eta']:g}: diverged" for r in summary["ours"])
        return f"λ_max·η/2 over the last half: {rows}; claim 1 ± 0.05"
    if name == "transformer_spikes":
        p, q = summary["ours"]["plain"], summary["ours"]["qk_layernorm"]
        return (f"max attn logit plain {p['attn_logit_max']:.3g} vs qk-LN {q['attn_logit_max']:.3g}; spikes "
                f"{p['n_spikes']} vs {q['n_spikes']}; final loss {p['final_loss']:.3f} vs {q['final_loss']:.3f}; "
                f"diagnose first cause: {p['first_spike_cause']}")
    if name == "grokking":
        return (f"train acc {v['final_train_accuracy']:.3f}, test acc {v['final_test_accuracy']:.3f} after "
                f"{v['steps']} steps; test ≥ 0.9 at step {v['test_acc_90_step']}")
    if name == "block_heterogeneity":
        return (f"JS⁰ of the weight blocks: GPT {v['js0_gpt']:.4f} vs CNN {v['js0_cnn']:.4f} ({v['ratio']:.2f}×); "
                f"every tensor: GPT {v['js0_all_blocks_gpt']:.4f} vs CNN {v['js0_all_blocks_cnn']:.4f}; "
                "claim: transformers more heterogeneous")
    if name == "skip_connections":
        return ("mean |λmin/λmax| over the plane: " + ", ".join(f"{k} {r:.3f}" for k, r in v["mean_ratio"].items())
                + f"; deep no-skip / deep skip {v['deep_noskip_over_deep_skip']:.2f} (claim > 2)")
    if name == "spike_no_more":
        return (f"spikes vanilla {v['n_spikes']['vanilla']} vs scaled-embed {v['n_spikes']['scaled_embed']}; max grad "
                f"norm ×{v['grad_norm_ratio_vanilla_over_scaled']:.2f}; diagnose names the embedding condition: "
                f"{v['diagnose_names_embedding_condition']}")
    if name == "opposing_signals":
        big = next(iter(summary["ours"].values()))
        return (f"planted sky groups: late loss-change correlation {big['change_correlation_late']:.2f}, probe "
                f"gradient cosine {big['probe_mean_gradient_cosine']:.2f}, precision {big['probe_precision']:.2f}; "
                f"λ_max {big['lambda_max_initial']:.2f} → {big['lambda_max_peak']:.2f} (2/η = "
                f"{big['threshold_2_over_eta']:.2f}); checks {v['checks']}; reproduced {v['claim_reproduced']}")
    if name == "outlier_hierarchy":
        return (f"GGN eigenvalues mostly from class means {v['from_class_means']}, from the means {v['from_means']}, "
                f"G_class rank {v['class_rank']} for C = {v['C']}; claim C from class means: {v['claim_reproduced']}")
    return json.dumps(v)[:200]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every experiment")
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ", ".join(EXPERIMENTS))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per experiment")
    args = ap.parse_args(argv)
    names = EXPERIMENTS if args.only is None else tuple(n.strip() for n in args.only.split(","))
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        print(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    failed = []
    for name in names:
        script = HERE / f"{name}.py"
        summary_path = HERE / "results" / name / "summary.json"
        t0 = time.time()
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            rc, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, err = "timeout", (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        dt = time.time() - t0
        if rc != 0 or not summary_path.exists() or summary_path.stat().st_mtime < t0:
            failed.append(name)
            tail = "\n".join(err.strip().splitlines()[-15:])
            print(f"FAIL {name} ({dt:.0f}s, exit {rc})\n{tail}", flush=True)
            continue
        summary = json.loads(summary_path.read_text())
        print(f"ok   {name} ({dt:.0f}s): {one_line(name, summary)}", flush=True)
    if failed:
        print(f"{len(failed)} of {len(names)} experiments failed: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
