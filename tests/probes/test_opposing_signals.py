"""opposing_signals on a constructed case with known opposing groups: exact recovery and closed-form cosines."""

import numpy as np
import pytest
import torch
from torch import nn

from lossatlas.probes.opposing_signals import OpposingSignals, group_gradient, opposing_groups, opposing_signals

D_IN = 4


def _case(a: float = 0.7, T: int = 6):
    """A bias-free linear 2-class model whose checkpoints oscillate along the "sky" weights W[:, 0].

    Group A: x = s·e0 with label 0 (sky → class 0); group B: x = s·e0 with label 1 (sky in class 1); the rest
    have no sky feature, so their losses never change. W_t = W_0 + (−1)^t·a·(e_0 − e_1)e_0ᵀ.
    """
    g = torch.Generator().manual_seed(0)
    sa = 1.0 + torch.rand(6, generator=g)
    sb = 1.0 + torch.rand(4, generator=g)
    rest = torch.randn(20, D_IN, generator=g)
    rest[:, 0] = 0.0
    x = torch.cat([sa[:, None] * torch.eye(D_IN)[0], rest[:10], sb[:, None] * torch.eye(D_IN)[0], rest[10:]])
    y = torch.cat([torch.zeros(6), torch.randint(0, 2, (10,), generator=g), torch.ones(4),
                   torch.randint(0, 2, (10,), generator=g)]).long()
    A, B = np.arange(6), np.arange(16, 20)
    model = nn.Linear(D_IN, 2, bias=False)
    W0 = torch.randn(2, D_IN, generator=g) * 0.3
    direction = torch.zeros(2, D_IN)
    direction[0, 0], direction[1, 0] = 1.0, -1.0
    states = [{"weight": W0 + (-1) ** t * a * direction} for t in range(T)]
    return model, x, y, states, A, B


def test_exact_recovery_of_the_planted_groups():
    model, x, y, states, A, B = _case()
    before = model.weight.detach().clone()
    res = opposing_signals(model, (x, y), states, top_k=len(A) + len(B))
    got = res.values["examples"]
    grp = res.values["group"]
    # the planted pair, as an unordered pair; group +1 holds the example that moved most (got[0])
    assert {frozenset(got[grp == 1]), frozenset(got[grp == -1])} == {frozenset(A), frozenset(B)}
    assert grp[0] == 1
    # the two groups' loss changes are exactly opposite in sign every step: correlation −1
    assert res.scalar("change_correlation") == pytest.approx(-1.0, abs=1e-9)
    # gradients (p − e_y) xᵀ: A ∝ −(1, −1)⊗e0, B ∝ +(1, −1)⊗e0 ⇒ cosine −1 at every checkpoint
    np.testing.assert_allclose(res.values["gradient_cosine"], -1.0, atol=1e-6)
    assert int(res.scalar("opposing")) == 1 and int(res.scalar("num_a")) + int(res.scalar("num_b")) == 10
    # the loss traces equal direct per-example cross-entropies
    for t, s in enumerate(states):
        direct = nn.functional.cross_entropy(x @ s["weight"].T, y, reduction="none").double().numpy()
        np.testing.assert_allclose(res.values["loss_trace"][:, t], direct[got], rtol=1e-6)
    torch.testing.assert_close(model.weight.detach(), before)  # the user's model is untouched


def test_top_k_larger_than_the_groups_keeps_the_still_examples_out_of_both():
    model, x, y, states, A, B = _case()
    res = opposing_signals(model, (x, y), states, top_k=14)
    grp, got = res.values["group"], res.values["examples"]
    assert {frozenset(got[grp == 1]), frozenset(got[grp == -1])} == {frozenset(A), frozenset(B)}
    assert (grp[~np.isin(got, np.concatenate([A, B]))] == 0).all()  # zero movement: neither group


def test_a_common_drift_does_not_merge_the_groups():
    """Every loss also falls steadily (a common descent): the drift is removed before grouping, so the opposing pair
    is still recovered exactly, and a steadily falling example is not selected over an oscillating one."""
    r = np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    amp = np.array([2.0, 1.5, -1.0, -2.5, 0.0])
    changes = np.outer(r, amp) - 3.0  # every example falls by 3 per step on top of its oscillation
    changes[:, 4] -= 10.0  # example 4 only falls (fast): no oscillation
    sel, sign = opposing_groups(changes, 4)
    assert set(sel) == {0, 1, 2, 3}
    assert {frozenset(sel[sign == 1]), frozenset(sel[sign == -1])} == {frozenset({0, 1}), frozenset({2, 3})}


def test_group_gradient_against_autograd_over_the_concatenated_group():
    model, x, y, states, A, B = _case()
    model.load_state_dict(states[1])
    batches = [(x[:13], y[:13]), (x[13:], y[13:])]  # the group spans two batches
    members = np.array([2, 5, 16, 19])
    got = group_gradient(model, batches, "cross_entropy", members)
    loss = nn.functional.cross_entropy(model(x[members]), y[members])
    (ref,) = torch.autograd.grad(loss, [model.weight])
    torch.testing.assert_close(got, ref.reshape(-1).double(), rtol=1e-6, atol=1e-8)


def test_opposing_groups_rank_one_closed_form():
    r = np.array([1.0, -1.0, 1.0, -1.0])
    amp = np.array([0.0, 3.0, -2.0, 0.5, -5.0, 0.0])  # examples 1, 3 rise with r; 2, 4 fall
    sel, sign = opposing_groups(np.outer(r, amp), 4)
    assert list(sel) == [4, 1, 2, 3]  # by movement |amp|·4, descending
    assert list(sign) == [1, -1, 1, -1]  # example 4 (largest) leads group A


def test_bad_input():
    with pytest.raises(ValueError, match="top_k"):
        OpposingSignals(top_k=1)
    with pytest.raises(ValueError, match="steps"):
        OpposingSignals(steps=(0, 1))
    model, x, y, states, *_ = _case(T=2)
    with pytest.raises(ValueError, match="at least 3 checkpoints"):
        opposing_signals(model, (x, y), states)


def test_diagnose_names_an_opposing_pair_of_group_losses():
    """A planted spike preceded by group A's loss rising and group B's falling: diagnose names opposing signals and
    says which group rose and which fell."""
    from lossatlas.analysis.diagnose import diagnose_log

    rng = np.random.default_rng(0)
    n, spike = 400, 300
    t = np.arange(1, n + 1)
    loss = (3.0 * (1 + t / 30) ** -0.4 + 0.5) * np.exp(0.02 * rng.standard_normal(n))
    loss[spike - 1: spike + 5] *= 3.0 ** (1 - np.arange(6) / 6)
    ramp = np.clip(t - 280, 0, spike - 280)
    log = {"step": t, "loss": loss,
           "group_loss/sky_a": np.exp(0.02 * rng.standard_normal(n) + 0.08 * ramp),
           "group_loss/sky_b": np.exp(0.02 * rng.standard_normal(n) - 0.06 * ramp)}
    d = diagnose_log(log)
    assert [s.cause for s in d.spikes] == ["opposing_signals"]
    v = d.spikes[0].verdict
    assert "sky_a rose while sky_b fell" in v or "sky_b fell while sky_a rose" in v, v
    log["group_loss/sky_b"] = np.exp(0.02 * rng.standard_normal(n) + 0.06 * ramp)  # both rise: no opposing pair
    assert " while " not in diagnose_log(log).spikes[0].verdict
