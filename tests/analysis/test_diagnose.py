"""``diagnose`` on synthetic run files with a planted cause, and the edge-of-stability
phase finder on synthetic sharpness curves (thresholds 2/η for GD, 38/η for Adam at β₁ = 0.9)."""

import json

import numpy as np
import pytest
import torch

from lossatlas.analysis import eos
from lossatlas.analysis.diagnose import diagnose, diagnose_command, diagnose_log, render_text, signal_layer
from lossatlas.store import RunWriter

N = 400
SPIKE = 300
PARAMS = ["tok_emb.weight", "blocks.0.attn.q_proj.weight", "blocks.0.attn.k_proj.weight",
          "blocks.1.mlp.fc.weight", "lm_head.weight"]


def _base_log(seed=0):
    """A healthy 400-step run: noisy power-law loss and noisy, stationary telemetry."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, N + 1)
    log = {"step": t, "loss": (3.0 * (1 + t / 30) ** -0.4 + 0.5) * np.exp(0.02 * rng.standard_normal(N)),
           "lr": np.full(N, 1e-3)}
    gn = {p: np.exp(0.1 * rng.standard_normal(N)) * (0.5 + i) for i, p in enumerate(PARAMS)}
    for p in PARAMS:
        log[f"grad_norm/{p}"] = gn[p]
        log[f"weight_norm/{p}"] = 3.0 + 0.001 * t + 0.001 * rng.standard_normal(N)
    log["grad_norm"] = np.sqrt(sum(v**2 for v in gn.values()))
    for layer in ("blocks.0", "blocks.1"):
        log[f"attn_logit_max/{layer}"] = 5.0 * np.exp(0.02 * rng.standard_normal(N))
    log["output_logz_mean"] = 4.0 + 0.01 * rng.standard_normal(N)
    return log


def _plant_spike(log, at=SPIKE, height=3.0, width=6):
    prof = height ** (1 - np.arange(width) / width)  # ×3 decaying back over `width` steps
    log["loss"][at - 1: at - 1 + width] *= prof


def _grow(log, name, start, rate, upto=SPIKE):
    """Exponential growth of a signal from `start` to `upto` (then stays)."""
    t = np.arange(1, N + 1)
    log[name] = log[name] * np.exp(rate * np.clip(t - start, 0, upto - start))


def _write(tmp_path, log, name="run.h5", ckpts=(250, 350)):
    path = tmp_path / name
    w = RunWriter(path, model_spec=None)
    names = [k for k in log if k != "step"]
    for i, s in enumerate(log["step"]):
        w.log(int(s), {k: float(log[k][i]) for k in names})
        if int(s) in ckpts:
            w.write_checkpoint(int(s), {"w": torch.zeros(2)})
    w.close()
    return path


def _only(d):
    assert len(d.spikes) == 1, [s.spike for s in d.spikes]
    return d.spikes[0]


def test_attention_logit_growth_named_first(tmp_path):
    log = _base_log()
    _grow(log, "attn_logit_max/blocks.0", start=230, rate=0.03)  # ×8 over 70 steps
    _grow(log, "grad_norm/blocks.0.attn.q_proj.weight", start=292, rate=0.3)  # a later consequence
    _plant_spike(log)
    path = _write(tmp_path, log)
    calls = []
    d = diagnose(path, curvature_fn=lambda step: calls.append(step) or 10.0 + step)
    sd = _only(d)
    assert sd.spike["start"] == SPIKE and sd.spike["kind"] == "spike"
    assert sd.cause == "attention_logit_growth"
    assert sd.precursors[0].signal == "attn_logit_max/blocks.0"
    assert 60 <= sd.precursors[0].lead_steps <= 80  # growth began 70 steps before
    moved = {p.signal for p in sd.precursors}
    assert "grad_norm/blocks.0.attn.q_proj.weight" in moved and "attn_logit_max/blocks.1" not in moved
    assert "qk-layernorm" in " ".join(sd.mitigations) and any("2309.14322" in c for c in sd.citations)
    assert sd.checkpoints == {"before": 250, "after": 350} and calls == [250, 350]
    assert sd.curvature == {"before": 260.0, "after": 360.0}
    fig = sd.figure
    assert SPIKE in fig["steps"] and len(fig["loss"]) == len(fig["steps"])
    assert "attn_logit_max/blocks.0" in fig["signals"]


def test_layer_gradient_explosion_names_the_layer(tmp_path):
    log = _base_log(1)
    _grow(log, "grad_norm/blocks.1.mlp.fc.weight", start=285, rate=0.3)  # ×90 in 15 steps
    log["grad_norm"] = np.sqrt(sum(log[f"grad_norm/{p}"] ** 2 for p in PARAMS))
    _plant_spike(log)
    sd = _only(diagnose(_write(tmp_path, log)))
    assert sd.cause == "layer_gradient_explosion"
    assert "blocks.1.mlp.fc" in sd.verdict
    top_layer = [p for p in sd.precursors if p.cause == "layer_gradient_explosion"][0]
    assert top_layer.layer == "blocks.1.mlp.fc" and top_layer.direction == "up"
    assert "clip" in " ".join(sd.mitigations) and any("2312.16903" in c for c in sd.citations)


def test_warmup_end_blames_the_lr_schedule(tmp_path):
    log = _base_log(2)
    log["lr"] = np.minimum(np.arange(1, N + 1) / 280, 1.0) * 3e-3
    _plant_spike(log, at=292)
    sd = _only(diagnose(_write(tmp_path, log)))
    assert sd.cause == "lr_schedule"
    assert sd.lr_event["kind"] == "warmup_end" and sd.lr_event["step"] == 280
    assert "warm-up" in " ".join(sd.mitigations)


def test_divergence_names_first_nonfinite_signal(tmp_path):
    log = _base_log(3)
    _grow(log, "attn_logit_max/blocks.0", start=240, rate=0.04)
    bad = "grad_norm/blocks.0.attn.k_proj.weight"
    log[bad][SPIKE - 1] = np.inf  # step 300
    for k in log:
        if k != "step" and k != bad:
            log[k][SPIKE:] = np.nan  # everything else from step 301 (the loss too)
    log[bad][SPIKE:] = np.nan
    d = diagnose(_write(tmp_path, log))
    assert d.diverged
    sd = _only(d)
    assert sd.spike["kind"] == "divergence" and sd.spike["start"] == SPIKE
    assert sd.first_nonfinite["signal"] == bad and sd.first_nonfinite["step"] == SPIKE
    assert sd.first_nonfinite["layer"] == "blocks.0.attn.k_proj"
    assert sd.cause == "attention_logit_growth"
    assert f"first non-finite signal {bad}" in sd.verdict
    text, data = diagnose_command(_write(tmp_path, log, "again.h5"), as_json=True)
    json.loads(text)  # strict JSON: no NaN/inf tokens
    assert data["diverged"] is True and data["spikes"][0]["spike"]["height_ratio"] is None


def test_no_spikes_says_so(tmp_path):
    text, data = diagnose_command(_write(tmp_path, _base_log(4)))
    assert data["spikes"] == [] and not data["diverged"]
    assert "no loss spikes detected in 400 logged steps" in text


def test_spike_without_precursor_is_a_data_batch():
    log = _base_log(5)
    log["loss"][SPIKE - 1] *= 2.5  # one step, back the next
    sd = _only(diagnose_log(log))
    assert sd.precursors == [] or all(p.cause is None for p in sd.precursors)
    assert sd.cause == "data_batch" and sd.spike["recovery"] == SPIKE + 1
    assert "skip" in sd.mitigations[0]
    assert "a data batch" in render_text(diagnose_log(log))


def test_diagnose_rejects_a_log_without_loss():
    with pytest.raises(ValueError, match="'step' and 'loss'"):
        diagnose_log({"step": np.arange(3), "grad_norm": np.ones(3)})
    assert signal_layer("grad_norm/blocks.0.mlp.fc.bias") == "blocks.0.mlp.fc"
    assert signal_layer("attn_logit_max/blocks.3") == "blocks.3" and signal_layer("grad_norm") is None


# -- edge of stability (Cohen et al. 2021) -----------------------------------------------------------------
def test_thresholds_match_closed_forms_and_simulation():
    assert eos.stability_threshold(0.01) == pytest.approx(200.0)
    assert eos.stability_threshold(1.0, optimizer="adam", beta=0.9) == pytest.approx(38.0)  # Cohen et al. 2022
    assert eos.stability_threshold(1.0, optimizer="heavy_ball", beta=0.9) == pytest.approx(3.8)
    assert eos.stability_threshold(1.0, optimizer="nesterov", beta=0.9) == pytest.approx(3.8 / 2.8)
    # GD on ½λx² diverges iff ηλ > 2
    lam = 7.0
    assert not eos.gd_diverges_on_quadratic(lam, 1.9 / lam)
    assert eos.gd_diverges_on_quadratic(lam, 2.1 / lam)

    # EMA momentum with frozen P = I diverges iff λ > (2+2β₁)/((1−β₁)η) = 38/η
    def ema_diverges(lam, eta=1.0, b=0.9, steps=3000):
        x, m = 1.0, 0.0
        for _ in range(steps):
            m = b * m + (1 - b) * lam * x
            x -= eta * m
        return abs(x) > 1.0

    assert not ema_diverges(37.5) and ema_diverges(38.5)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        eos.stability_threshold(0.1, optimizer="sgd")


def test_phase_finder_on_a_synthetic_sharpness_curve():
    """λ flat at 5 until step 200, rises linearly to 2/η = 20 at step 600, then oscillates at 20 ± 3 %."""
    eta = 0.1
    steps = np.arange(0, 1501, 10)
    lam = np.where(steps < 200, 5.0, np.minimum(5.0 + (steps - 200) * 15.0 / 400, 20.0))
    lam[:10] += np.linspace(1.0, 0.0, 10)  # a small initial drop: the minimum sits at step 100-200
    rng = np.random.default_rng(0)
    lam = np.where(steps >= 600, 20.0 * (1 + 0.03 * rng.standard_normal(steps.size)), lam)
    a = eos.eos_phases(steps, lam, eta)
    assert 540 <= a.eos_onset <= 560  # λ crosses 0.9·20 = 18 at step 560 (three in a row from 540)
    assert a.eos == (a.eos_onset, 1500)
    lo, hi = a.sharpening
    assert 90 <= lo <= 200 and hi == a.eos_onset
    assert a.sharpening_rate == pytest.approx(15.0 / 400, rel=0.25)
    assert a.eos_ratio_mean == pytest.approx(1.0, abs=0.02)
    assert a.ratio[-1] == pytest.approx(lam[-1] * eta / 2)
    assert set(a.phase) == {"other", "sharpening", "eos"}
    # never reaching the band: sharpening only; per-step lr accepted
    b = eos.eos_phases(steps[:40], lam[:40], np.full(40, eta))
    assert b.eos_onset is None and b.sharpening is not None and b.eos_ratio_mean is None
    json.dumps(a.to_dict())
    with pytest.raises(ValueError, match="one per step"):
        eos.eos_phases(steps, lam, np.ones(3))


def test_slow_sustained_attention_logit_growth_is_named_first():
    """Exponential attention-logit growth that started long before the window (Wortsman et al. 2023): the
    step-to-step changes look ordinary, the level does not; small logits growing from ~0 do not count."""
    import numpy as np

    from lossatlas.analysis.diagnose import diagnose_log

    rng = np.random.default_rng(3)
    steps = np.arange(1, 601)
    loss = 3.0 * steps ** -0.2 * np.exp(rng.normal(0, 0.02, steps.size))
    loss[400:420] *= 6.0
    grow = 0.5 * np.exp(np.clip(steps - 50, 0, None) * 0.02) * np.exp(rng.normal(0, 0.05, steps.size))
    small = 0.05 + 0.01 * steps / 60 * np.exp(rng.normal(0, 0.05, steps.size))  # 0.05 → 0.15: not large
    gnorm = np.exp(rng.normal(0, 0.1, steps.size))
    gnorm[330:] *= 3.0  # a later, ordinary-looking jump
    d = diagnose_log({"step": steps, "loss": loss, "attn_logit_max/blocks.1": grow, "attn_logit_max/blocks.0": small,
                      "grad_norm/blocks.1.mlp.weight": gnorm}).to_dict()
    first = d["spikes"][0]
    assert first["cause"] == "attention_logit_growth"
    assert first["precursors"][0]["signal"] == "attn_logit_max/blocks.1"
    assert all(p["signal"] != "attn_logit_max/blocks.0" for p in first["precursors"])


def test_checkpoint_sharpness_is_the_cached_hessian_probe(tmp_path):
    """λ_max around a spike is the ``hessian`` probe at top_k=1 through the runner: the dense float64 Hessian's
    largest eigenvalue (to the Lanczos tolerance 1e-4), stored in the results file and found there by a later
    ``hessian`` run with the same data settings; a checkpoint holding NaN, or a run without data, gives None."""
    from torch.func import functional_call

    from lossatlas import models
    from lossatlas.analysis.diagnose import checkpoint_sharpness
    from lossatlas.analysis.runner import RunOptions, load_batches, run_probe
    from lossatlas.batches import to_device
    from lossatlas.losses import data_loss
    from lossatlas.probes.hessian import HessianProbe
    from lossatlas.probes.paramdicts import flatten, unflatten

    spec, digits = {"name": "mlp", "kwargs": {"widths": [64, 4, 10]}}, {"name": "digits"}
    state = models.build_model(spec).state_dict()
    broken = {k: v.clone() for k, v in state.items()}
    broken["layers.0.weight"].view(-1)[3] = float("nan")
    path = tmp_path / "run.h5"
    w = RunWriter(path, model_spec=spec, data_spec=digits, loss="cross_entropy")
    w.write_checkpoint(0, state)
    w.write_checkpoint(1, broken)
    w.close()

    lam = checkpoint_sharpness(path, max_examples=300, batch_size=128)
    got = lam(0)
    ref = models.build_model(spec).double().eval()
    ref.load_state_dict(state)
    like = {n: p.detach() for n, p in ref.named_parameters()}
    batches = to_device(load_batches(digits, batch_size=128, max_examples=300), "cpu", torch.float64)
    H = torch.autograd.functional.hessian(
        lambda flat: data_loss("cross_entropy", lambda x: functional_call(ref, unflatten(flat, like), (x,)), batches),
        flatten(like, list(like)))
    assert got == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=2e-4)

    again = run_probe(path, HessianProbe(top_k=1), RunOptions(steps=[0], batch_size=128, max_examples=300))
    assert [o.status for o in again.outcomes] == ["cached"]
    assert float(again.results[0].values["top_eigenvalues"][0]) == got
    assert checkpoint_sharpness(path, max_examples=300, batch_size=128)(0) == got  # read back, not recomputed
    assert lam(1) is None and lam(7) is None  # NaN checkpoint; no checkpoint at that step

    bare = tmp_path / "bare.h5"
    w = RunWriter(bare, model_spec=spec, loss="cross_entropy")
    w.write_checkpoint(0, state)
    w.close()
    assert checkpoint_sharpness(bare)(0) is None


def test_diagnose_without_a_loss_log_exits_2_saying_how_to_add_one(tmp_path, capsys):
    """An imported run (checkpoints, no per-step log): one line on stderr, exit 2, no traceback."""
    from lossatlas.cli import main

    path = tmp_path / "imported.h5"
    w = RunWriter(path, model_spec=None)
    w.write_checkpoint(100, {"w": torch.zeros(2)})
    w.close()
    for extra in ([], ["--json"], ["--no-curvature"]):
        assert main(["diagnose", str(path), *extra]) == 2
        out, err = capsys.readouterr()
        assert out == "" and "Traceback" not in err
        lines = err.strip().splitlines()
        assert len(lines) == 1, lines
        assert "has no loss log" in lines[0] and "--log FILE" in lines[0] and "Recorder" in lines[0]
