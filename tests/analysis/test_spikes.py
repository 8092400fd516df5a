"""Spike detector: no false positives on noisy power-law curves, measured recall on planted spikes,
divergence handling, and the llm-foundry / Megatron rules."""

import numpy as np
import pytest

from lossatlas.analysis.spikes import detect_spikes, first_nonfinite, llm_foundry_spikes, megatron_spikes

K, SIGMA = 6.0, 0.05  # sensitivity and the multiplicative noise of the synthetic curves


def _curve(seed, n=2000):
    """ℓ_t = (3(1 + t/50)^−½ + 0.5)·exp(σ ε_t): a power law with multiplicative log-normal noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, n + 1)
    return t, (3.0 * (1 + t / 50) ** -0.5 + 0.5) * np.exp(SIGMA * rng.standard_normal(n)), rng


def test_no_false_positives_on_noisy_decreasing_curves():
    total = 0
    for seed in range(12):
        t, loss, _ = _curve(seed)
        total += len(detect_spikes(t, loss, sensitivity=K))
    assert total == 0
    # the same curves at a very sensitive setting do flag noise: the test above can fail
    t, loss, _ = _curve(0)
    assert len(detect_spikes(t, loss, sensitivity=2.0, height_sigmas=2.0)) > 0


def test_recall_on_planted_spikes():
    """Heights h·kσ (h uniform in [1, 3]× the nominal threshold kσ in log-loss), widths 1-20:
    recall ≥ 0.95 from 1.5× the nominal height, ≥ 0.5 between 1× and 1.5×, no false positive."""
    found = {"1-1.5x": [0, 0], ">=1.5x": [0, 0]}
    false = 0
    for seed in range(8):
        t, loss, rng = _curve(100 + seed, n=3000)
        y = np.log(loss)
        starts = np.arange(150, 2850, 225)
        heights = rng.uniform(1.0, 3.0, starts.size)
        widths = rng.integers(1, 21, starts.size)
        for s0, h, w in zip(starts, heights, widths):
            prof = np.exp(-np.abs(np.arange(w) - w // 2) / max(w / 4, 0.5))
            y[s0: s0 + w] += h * K * SIGMA * prof / prof.max()
        spikes = detect_spikes(t, np.exp(y), sensitivity=K)
        hit_any = set()
        for s0, h, w in zip(starts, heights, widths):
            hit = [sp for sp in spikes if t[s0] - 1 <= sp.start <= t[s0 + w - 1]]
            key = "1-1.5x" if h < 1.5 else ">=1.5x"
            found[key][0] += bool(hit)
            found[key][1] += 1
            hit_any.update(id(sp) for sp in hit)
            for sp in hit:
                assert sp.peak >= sp.start and sp.height_ratio > 1.0 and sp.height_abs > 0
                assert sp.recovery is not None and sp.recovery > sp.peak
        false += sum(id(sp) not in hit_any for sp in spikes)
    recall = {k: v[0] / v[1] for k, v in found.items()}
    overall = sum(v[0] for v in found.values()) / sum(v[1] for v in found.values())
    print("recall", recall, "overall", overall)
    # measured: ≈0.4 just above the nominal threshold kσ (noise at the peak and in the level it is
    # measured from cut both ways; the height test trades this for no false alarm on heavy-tailed
    # mini-batch noise), ≈0.97 from 1.5 kσ on (documented in detect_spikes)
    assert recall[">=1.5x"] >= 0.95
    assert recall["1-1.5x"] >= 0.3
    assert overall >= 0.75
    assert false == 0


def test_two_spikes_inside_one_window_are_both_caught():
    """3e^{−t/2000} + 0.01ε with +0.5 spikes 30 steps apart; exclusion prevents masking."""
    rng = np.random.default_rng(7)
    t = np.arange(10_000)
    loss = 3 * np.exp(-t / 2000) + 0.01 * rng.standard_normal(t.size)
    for s0, w in ((3000, 5), (3030, 1), (7000, 20)):
        loss[s0: s0 + w] += 0.5
    spikes = detect_spikes(t, loss, sensitivity=7.0, scale="linear")
    assert [sp.start for sp in spikes] == [3000, 3030, 7000]
    assert spikes[0].recovery == 3005 and spikes[2].recovery == 7020
    assert spikes[0].height_abs == pytest.approx(0.5, abs=0.06)


def test_divergence_event_and_level_shift():
    t, loss, _ = _curve(3, n=600)
    loss[400] = np.nan
    loss[450] = 5.0
    spikes = detect_spikes(t, loss)
    assert [sp.kind for sp in spikes] == ["divergence"] and spikes[0].start == 401
    assert spikes[0].recovery is None and spikes[0].height_ratio == np.inf
    assert first_nonfinite(loss) == 400 and first_nonfinite(loss[:400]) is None
    t, loss, _ = _curve(4, n=600)
    loss[300:] *= 3.0  # the loss jumps and stays: one unrecovered event, then quiet
    spikes = detect_spikes(t, loss)
    assert len(spikes) == 1 and spikes[0].start == 301 and spikes[0].recovery is None


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same length"):
        detect_spikes([1, 2, 3], [1.0, 2.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        detect_spikes([1, 1, 2], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="scale='linear'"):
        detect_spikes(np.arange(10), -np.ones(10))
    with pytest.raises(ValueError, match="sensitivity"):
        detect_spikes(np.arange(10), np.ones(10), sensitivity=0)


def test_llm_foundry_and_megatron_rules():
    """llm-foundry KillLossSpike (window 100, ×2, patience 4; outliers enter the window) and
    Megatron (flag ≥ 10× the max of the first 100 values)."""
    assert llm_foundry_spikes([1.0] * 100 + [3.0] * 20)[0] == 104
    assert llm_foundry_spikes([1.0] * 100 + [2.0] * 50) == []
    warm = np.abs(np.random.default_rng(0).standard_normal(100)) + 0.1
    m = warm.max()
    assert megatron_spikes(np.concatenate([warm, [10 * m, 9.99 * m]])) == [100]


def test_no_false_positive_where_a_steep_first_drop_bends_into_a_plateau():
    """The extrapolated trend undershoots where the decay slows; a loss below its recent level is no spike."""
    t = np.arange(1, 601)
    found = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        for tau in (10, 20, 40):
            loss = (0.8 + 3 * np.exp(-t / tau)) * np.exp(0.01 * rng.standard_normal(t.size))
            found += len(detect_spikes(t, loss))
    assert found == 0


def _heavy_tailed(seed, n=1000):
    """A flat log-loss with heavy-tailed noise: 80 % N(0, 0.01²), 20 % N(0, 0.025²) (batches holding hard examples)."""
    rng = np.random.default_rng(seed)
    y = 0.01 * rng.standard_normal(n)
    tail = rng.random(n) < 0.2
    y[tail] = 0.025 * rng.standard_normal(int(tail.sum()))
    return np.arange(1, n + 1), y


def test_heavy_tailed_noise_is_not_a_spike_but_a_real_rise_is():
    """The robust z alone calls the tail of heavy-tailed noise a ≥6σ̂ event; the height test over σ_n does not."""
    z_only = both = 0
    for seed in range(10):
        t, y = _heavy_tailed(seed)
        z_only += len(detect_spikes(t, np.exp(y), height_sigmas=0.0))
        both += len(detect_spikes(t, np.exp(y)))
    # measured: 12 with the robust z alone, 2 with both tests (this mixture's tail is heavier than
    # mini-batch noise's; on real clean runs both tests give 0 where the z alone gives 11: bench_diagnose)
    assert z_only >= 8  # the z-only rule fires on this noise: the assertion below can fail
    assert both <= z_only // 4
    t, y = _heavy_tailed(3)
    y[400] += 0.6  # ≈ 20 σ_n: a real spike
    spikes = detect_spikes(t, np.exp(y))
    assert [sp.start for sp in spikes] == [401]
    sp = spikes[0]
    # σ_n = std(Δy)/√2 over the previous 100 accepted steps, the level the median of the last 10
    # (the detector refits every 5 steps: the window it used ends ≤ 5 steps earlier, hence the tolerance)
    sigma_n = np.std(np.diff(y[300:400])) / np.sqrt(2)
    assert sp.noise_std == pytest.approx(sigma_n, rel=0.1)
    assert sp.height_sigmas == pytest.approx((y[400] - np.median(y[390:400])) / sigma_n, rel=0.1)
    assert sp.noise_std > 1.1 * sp.noise_sigma  # heavy tail: the std is above the MAD-based σ̂ (theory: 1.24×)
    with pytest.raises(ValueError, match="height_sigmas"):
        detect_spikes(t, np.exp(y), height_sigmas=-1.0)
