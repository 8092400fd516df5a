"""Every paper reproduction in experiments/ runs end to end in a tiny configuration (seconds, in every CI).

The claims themselves need the longer runs: tests/test_experiments.py (``-m slow``) and ``make experiments``.
Here each script must train, probe, draw its figure and write a summary that states the claim next to
our numbers and a verdict computed from them.
"""

from __future__ import annotations

import json

import pytest
from test_experiments import load

SMOKE = {
    "eos_gd": ["--steps", "40", "--etas", "0.4", "--eig-every", "20"],
    "hessian_outliers": ["--quick", "--cases", "1", "--max-steps", "20", "--slq-steps", "8"],
    "transformer_spikes": ["--quick", "--steps", "60", "--warmup", "20", "--batch", "8"],
    "grokking": ["--quick", "--steps", "60", "--eval-every", "20"],
    "neural_collapse": ["--quick", "--steps", "60"],
    "skip_connections": ["--depths", "1,2", "--widths", "4,8", "--steps", "10", "--n-examples", "32", "--grid", "5",
                         "--cgrid", "2", "--iters", "3"],
    "spike_no_more": ["--steps", "30", "--warmup", "5", "--n-embd", "16", "--checkpoint-every", "10"],
    "deep_linear_collapse": ["--quick", "--cases", "mse_imbalanced"],
    "massive_activations": ["--steps", "20", "--every", "10"],
    "opposing_signals": ["--steps", "30", "--eig-every", "10", "--window", "8", "--n", "200"],
    "outlier_hierarchy": ["--quick", "--cases", "1", "--max-steps", "20"],
}


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_experiment_runs_end_to_end(name, tmp_path):
    summary = load(name).main([*SMOKE[name], "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["experiment"] == summary["experiment"] == name
    assert on_disk["claim"] and on_disk["ours"] and on_disk["verdict"]
    figures = [f for f in on_disk["figures"] if f.endswith(".png")]
    assert figures and all((tmp_path / f).stat().st_size > 1000 for f in figures)
