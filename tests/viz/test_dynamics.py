"""Spike and edge-of-stability figures: drawn from a real diagnosis, not blank, the spike start marked."""

import numpy as np

from lossatlas.analysis.diagnose import diagnose_log
from lossatlas.viz.dynamics import eos_figure, spikes_figure, spikes_plotly
from lossatlas.viz.style import figure_rgba


def _ink(fig) -> float:
    rgba = figure_rgba(fig)
    return float((rgba[..., :3] < 250).any(axis=-1).mean())


def _log_with_spike():
    rng = np.random.default_rng(0)
    steps = np.arange(1, 401)
    loss = 2.0 * steps ** -0.3 * np.exp(rng.normal(0, 0.02, steps.size))
    attn = np.ones(steps.size)
    attn[250:300] = np.exp(np.linspace(0, 3, 50))  # grows before the spike at 300
    loss[300:305] *= 8.0
    return {"step": steps, "loss": loss, "attn_logit_max/blocks.0.attn": attn}


def test_spikes_figure_draws_loss_and_precursor():
    d = diagnose_log(_log_with_spike()).to_dict()
    assert d["spikes"] and d["spikes"][0]["cause"] == "attention_logit_growth"
    fig = spikes_figure(d)
    assert _ink(fig) > 0.02
    top, bottom = fig.axes[0], fig.axes[1]
    assert any(abs(line.get_xdata()[0] - d["spikes"][0]["spike"]["start"]) < 1e-9 for line in top.lines[1:])
    assert [t.get_text() for t in bottom.get_legend().get_texts()][0] == "attn_logit_max/blocks.0.attn"
    assert len(spikes_plotly(d).data) == 2


def test_spikes_figure_without_spikes_says_so():
    rng = np.random.default_rng(1)
    steps = np.arange(1, 301)
    d = diagnose_log({"step": steps, "loss": steps ** -0.5 * np.exp(rng.normal(0, 0.02, 300))}).to_dict()
    assert d["spikes"] == []
    fig = spikes_figure(d)
    assert "no loss spikes" in " ".join(t.get_text() for t in fig.axes[0].texts)
    assert spikes_plotly(d) is None


def test_eos_figure_marks_threshold_and_phase():
    steps = np.arange(0, 100, 5.0)
    ratio = np.minimum(1.0, steps / 50)
    phases = ["sharpening" if r < 0.9 else "eos" for r in ratio]
    fig = eos_figure(steps, ratio, phases=phases)
    ax = fig.axes[0]
    assert any(np.allclose(line.get_ydata(), 1.0) for line in ax.lines)
    assert len(ax.patches) == 1 and _ink(fig) > 0.02
