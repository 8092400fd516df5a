"""How ``path="auto"`` chooses between double backward and forward-over-reverse by measurement.

The choice logic is tested with injected timings and sizes (the operator's ``_measure`` wrapped so
that the real product runs but the clock and the memory meter report given numbers): no assertion
depends on wall time. The products themselves are checked against dense float64 Hessians and GGNs
(reference.py) on a small convolutional model with BatchNorm, in eval and train mode: whichever path
"auto" runs, it gives the same numbers to 1e-12.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lossatlas.curvature import GGNOperator, HessianOperator, base, make_operator
from lossatlas.curvature.base import AUTO_EXPLORE_BATCHED, AUTO_EXPLORE_RATIO, AUTODIFF_PATHS, _PeakMemory, path_bucket
from lossatlas.probes.hessian import hessian_spectrum

import reference

DT = torch.float64
DB, FR = AUTODIFF_PATHS


@pytest.fixture(autouse=True)
def explore_at_once(monkeypatch):
    """Operators built in these tests try the second path on the bucket's second product.

    (The default runs 10 products first; tested on its own below.) Choices remembered by the
    process for the same problem are forgotten, so each test's injected timings decide.
    """
    monkeypatch.setattr(base, "AUTO_EXPLORE_RATIO", 0)
    monkeypatch.setattr(base, "_CHOICES", {})


class ConvBN(nn.Module):
    """Conv 1→2 (3×3) → BatchNorm2d → tanh → linear 2·4·4 → 3: 77 parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x.reshape(-1, 1, 4, 4)))).flatten(1))


def conv_bn_case():
    """The model with non-trivial BatchNorm statistics and affine parameters, and batches of 6 and 4."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ConvBN().to(DT)
    with torch.no_grad():
        model.bn.running_mean.copy_(0.3 * torch.randn(2, generator=g, dtype=DT))
        model.bn.running_var.copy_(torch.rand(2, generator=g, dtype=DT) + 0.5)
        model.bn.weight.copy_(1 + 0.3 * torch.randn(2, generator=g, dtype=DT))
        model.bn.bias.copy_(0.3 * torch.randn(2, generator=g, dtype=DT))
    batches = [(torch.randn(n, 16, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)) for n in (6, 4)]
    return model, batches


def vectors(P, K, seed=1):
    return torch.randn(P, K, generator=torch.Generator().manual_seed(seed), dtype=DT)


def inject(op, seconds, sizes=None):
    """Make ``op``'s calibration report ``seconds[bucket][path]`` (total for the product) and ``sizes``.

    The real product still runs (its result is returned); returns the list of (path, K) measured.
    """
    real = op._measure
    measured = []

    def fake(path, M, size=True):
        out, _, _ = real(path, M, size)
        b = path_bucket(M.shape[1])
        measured.append((path, M.shape[1]))
        extra = None if sizes is None or not size else sizes[b][path]
        return out, seconds[b][path], extra

    op._measure = fake
    return measured


def count_products(op):
    """Record the path of every product the operator computes (calibration or not)."""
    real = op._product
    ran = []

    def spy(path, M):
        ran.append(path)
        return real(path, M)

    op._product = spy
    return ran


# ---------------------------------------------------------------------------- choice by measurement
def test_path_bucket_is_the_next_power_of_two():
    assert [path_bucket(k) for k in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 32]


@pytest.mark.parametrize("fast", AUTODIFF_PATHS)
def test_auto_picks_the_path_the_calibration_found_fastest(fast):
    model, batches = conv_bn_case()
    op = HessianOperator(model, batches)
    slow = FR if fast == DB else DB
    measured = inject(op, {4: {fast: 1.0, slow: 3.0}})
    ran = count_products(op)
    V = vectors(op.num_params, 4)
    for _ in range(5):
        op @ V
    # no wasted work: the first product ran on double backward, the second on the other path, then the winner
    assert ran == [DB, FR, fast, fast, fast]
    assert measured == [(DB, 4), (FR, 4)]
    assert op.chosen_path == {4: fast} and op.path == fast
    assert op.path_timings == {4: {fast: 0.25, slow: 0.75}}  # seconds per vector
    assert op.matvecs == 20
    # the graphs double backward kept while calibrating are freed when no bucket chose it
    assert (len(op._graphs) > 0) == (fast == DB) and (op._graph_bytes > 0) == (fast == DB)


def test_choice_is_cached_per_block_size_bucket():
    model, batches = conv_bn_case()
    op = HessianOperator(model, batches)
    measured = inject(op, {1: {DB: 1.0, FR: 2.0}, 8: {DB: 16.0, FR: 8.0}, 2: {DB: 5.0, FR: 1.0}})
    P = op.num_params
    for K in (1, 1, 1, 8, 8, 5, 7, 1):  # 5 and 7 share bucket 8 with 8
        op @ vectors(P, K)
    assert measured == [(DB, 1), (FR, 1), (DB, 8), (FR, 8)]
    assert op.chosen_path == {1: DB, 8: FR}
    assert op.path == DB  # the last product (K = 1)
    op @ vectors(P, 6)
    assert op.path == FR
    # a new bucket tries the nearest bucket's winner first (bucket 2 is as near to 1 as to 4; 1 wins ties)
    ran = count_products(op)
    op @ vectors(P, 2)
    assert ran == [DB] and measured[-1] == (DB, 2) and 2 not in op.chosen_path
    op @ vectors(P, 2)
    op @ vectors(P, 2)
    assert ran == [DB, FR, FR] and op.chosen_path[2] == FR


def test_an_explicit_path_is_never_measured():
    model, batches = conv_bn_case()
    op = HessianOperator(model, batches, path="forward_over_reverse")
    measured = inject(op, {})
    for K in (1, 8):
        op @ vectors(op.num_params, K)
    assert measured == [] and op.chosen_path == {} and op.path == FR


@pytest.mark.parametrize(
    "budget, sizes, expected",
    [
        (5_000, {DB: 1_000, FR: 10_000}, DB),  # the faster path does not fit: the other one
        (50_000, {DB: 1_000, FR: 10_000}, FR),  # both fit: the faster
        (500, {DB: 1_000, FR: 10_000}, DB),  # neither fits: the smaller
        (500, {DB: 90_000, FR: 10_000}, FR),
        (5_000, {DB: None, FR: 10_000}, DB),  # not measurable: assumed to fit
    ],
)
def test_memory_budget(budget, sizes, expected):
    model, batches = conv_bn_case()
    op = HessianOperator(model, batches, memory_budget=budget)
    inject(op, {4: {DB: 2.0, FR: 1.0}}, {4: sizes})
    for _ in range(3):
        op @ vectors(op.num_params, 4)
    assert op.chosen_path == {4: expected} and op.path == expected
    assert op.path_memory == {4: sizes}


def test_default_budget_is_the_available_memory():
    model, batches = conv_bn_case()
    op = HessianOperator(model, batches)
    inject(op, {1: {DB: 2.0, FR: 1.0}}, {1: {DB: 1_000, FR: 2**62}})  # 4 EiB: more than any machine has
    for _ in range(3):
        op @ vectors(op.num_params, 1)
    assert op.chosen_path == {1: DB}


def test_out_of_memory_while_calibrating_rules_the_path_out_for_that_bucket_only():
    model, batches = conv_bn_case()
    op = HessianOperator(model, batches)
    real = op._matmat_functional

    def functional(M):
        if M.shape[1] >= 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(M)

    op._matmat_functional = functional
    inject(op, {1: {DB: 2.0, FR: 1.0}, 8: {DB: 2.0, FR: 1.0}})
    dense = reference.hessian(model, batches, "cross_entropy", "eval")
    V = vectors(op.num_params, 8)
    for _ in range(3):
        reference.close(op @ V, dense @ V, rtol=1e-12)
    assert op.chosen_path == {8: DB} and op.path_timings[8][FR] == float("inf") and FR not in op._failed
    for _ in range(3):
        op @ V[:, 0]
    assert op.chosen_path[1] == FR  # still works (and is faster) for one vector
    report = json.loads(json.dumps(op.path_report()))
    assert report["seconds_per_vector"]["8"][FR] == "inf" and report["extra_bytes"]["8"][FR] == "inf"


class _CubeNoForwardAD(torch.autograd.Function):
    """x³ without a jvp: forward-mode AD (forward-over-reverse) raises."""

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 3 * x**2


class _CubeNet(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(h**3 if self.fn is None else self.fn.apply(h))


def test_fallback_when_forward_mode_raises_during_calibration():
    torch.manual_seed(5)
    model = _CubeNet(_CubeNoForwardAD).to(DT)
    plain = _CubeNet(None).to(DT)
    plain.load_state_dict(model.state_dict())
    data = [(0.5 * torch.randn(6, 3, dtype=DT), torch.randint(0, 2, (6,)))]
    op = HessianOperator(model, data)
    dense = reference.hessian(plain, data, "cross_entropy", "eval")
    V = vectors(op.num_params, 3)
    for _ in range(3):  # double backward, forward-over-reverse (raises: double backward again), chosen
        reference.close(op @ V, dense @ V, rtol=1e-12)
        assert op.path == DB
    assert FR in op._failed and op.chosen_path == {4: DB} and set(op.path_timings[4]) == {DB}


def test_fallback_when_double_backward_raises():
    model, batches = conv_bn_case()
    op = HessianOperator(model, batches)

    def broken(M):
        raise RuntimeError("derivative for some_op is not implemented")

    op._matmat_double_backward = broken
    ran = count_products(op)
    dense = reference.hessian(model, batches, "cross_entropy", "eval")
    V = vectors(op.num_params, 2)
    for _ in range(2):
        reference.close(op @ V, dense @ V, rtol=1e-12)
    assert ran == [DB, FR, FR] and op.path == FR and op.chosen_path == {2: FR} and DB in op._failed


def test_the_second_path_is_tried_after_explore_ratio_products():
    model, batches = conv_bn_case()
    op = HessianOperator(model, batches)
    assert op.explore_ratio == 0  # the fixture's setting; the module defaults are 20 and 1
    assert AUTO_EXPLORE_RATIO == 20 and AUTO_EXPLORE_BATCHED == 1 and op.explore_batched == 1
    op.explore_ratio = 3
    op.explore_batched = 2
    inject(op, {1: {DB: 1.0, FR: 0.5}, 4: {DB: 0.1, FR: 0.2}})
    ran = count_products(op)
    for _ in range(6):
        op @ vectors(op.num_params, 1)
    assert ran == [DB, DB, DB, FR, FR, FR]
    assert op.chosen_path == {1: FR} and op.path_timings[1] == {DB: 1.0, FR: 0.5}
    for _ in range(2):  # bucket 4 starts on bucket 1's winner; 2 products: the other path not tried yet
        op @ vectors(op.num_params, 4)
    assert ran[6:] == [FR, FR] and 4 not in op.chosen_path
    report = op.path_report()
    assert report["chosen"] == {"1": FR, "4": FR} and report["untried"] == {"4": [DB]}
    op @ vectors(op.num_params, 4)
    op @ vectors(op.num_params, 4)
    assert ran[8:] == [DB, DB] and op.chosen_path[4] == DB


def test_default_schedule_tries_a_batched_bucket_on_its_second_product(monkeypatch):
    monkeypatch.setattr(base, "AUTO_EXPLORE_RATIO", 20)  # the module defaults, not the fixture's
    model, batches = conv_bn_case()
    op = HessianOperator(model, batches)
    assert (op.explore_ratio, op.explore_batched) == (20, 1)
    inject(op, {1: {DB: 1.0, FR: 0.5}, 16: {DB: 2.0, FR: 1.0}})
    ran = count_products(op)
    for _ in range(4):  # a short Hutchinson-like workload: 4 products of 16 vectors
        op @ vectors(op.num_params, 16)
    assert ran == [DB, FR, FR, FR] and op.chosen_path == {16: FR}
    for _ in range(22):  # one vector: 20 products on the likely winner, the other path on the 21st
        op @ vectors(op.num_params, 1)
    # bucket 1 starts on bucket 16's winner and tries double backward on its 21st product only
    assert ran[4:] == [FR] * 20 + [DB, FR]
    assert op.path_timings[1] == {FR: 0.5, DB: 1.0} and op.chosen_path[1] == FR


def test_a_batched_bucket_waits_when_the_other_paths_startup_would_dominate(monkeypatch):
    """Forward-over-reverse's first use in a process imports torch._dynamo (seconds): a batched bucket of cheap
    products tries it early only once that is paid; products of ≥ FOR_STARTUP_S try it on the second product."""
    model, batches = conv_bn_case()
    for warm, seconds, expected in ((set(), 0.01, [DB] * 4), ({FR}, 0.01, [DB, FR, FR, FR]),
                                    (set(), base.FOR_STARTUP_S, [DB, FR, FR, FR])):
        monkeypatch.setattr(base, "_WARM", {DB, *warm})
        op = HessianOperator(model, batches)
        op.explore_ratio, op.explore_batched = 20, 1  # the module defaults, not the fixture's
        inject(op, {16: {DB: seconds, FR: seconds / 2}})
        ran = count_products(op)
        for _ in range(4):
            op @ vectors(op.num_params, 16)
        assert ran == expected, (warm, seconds)


def test_a_rerun_in_the_process_is_bit_identical():
    model, batches = conv_bn_case()
    runs = []
    for seconds in ({1: {DB: 1.0, FR: 2.0}}, {1: {DB: 2.0, FR: 1.0}}):  # the second run's clock disagrees
        op = HessianOperator(model, batches, dtype=torch.float32)
        op.explore_ratio = 2
        inject(op, seconds)
        ran = count_products(op)
        runs.append((torch.stack([op @ vectors(op.num_params, 1, seed=i).float() for i in range(6)]), ran))
    (a, ran_a), (b, ran_b) = runs
    assert ran_a == ran_b == [DB, DB, FR, DB, DB, DB]  # the first choice is kept for the same problem
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------- same numbers on any path
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("winner", AUTODIFF_PATHS + ("measured",))
def test_auto_equals_each_explicit_path_and_the_dense_matrix(kind, mode, winner):
    model, batches = conv_bn_case()
    dense = (reference.hessian if kind == "hessian" else reference.ggn)(model, batches, "cross_entropy", mode)
    auto = make_operator(kind, model, batches, mode=mode)
    if winner != "measured":  # force the choice both ways; "measured" keeps the real clock
        loser = FR if winner == DB else DB
        inject(auto, {b: {winner: 1.0, loser: 2.0} for b in (1, 4)})
    explicit = {p: make_operator(kind, model, batches, mode=mode, path=p) for p in AUTODIFF_PATHS}
    for K in (1, 1, 1, 3, 3, 3):  # calibration on both paths, then the chosen one, for two buckets
        V = vectors(auto.num_params, K, seed=K)
        got = auto @ V
        for op in explicit.values():
            reference.close(got, op @ V, rtol=1e-12)
        reference.close(got, dense @ V, rtol=1e-10)
    assert set(auto.chosen_path) == {1, 4}
    if winner != "measured":
        assert auto.chosen_path == {1: winner, 4: winner}


def test_bn_train_mode_never_updates_running_stats_during_calibration():
    model, batches = conv_bn_case()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    op = GGNOperator(model, batches, mode="train")
    for K in (1, 1, 1, 4, 4):
        op @ vectors(op.num_params, K)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training  # nn.Module's default, restored


# ---------------------------------------------------------------------------- recorded choice and sizes
def test_report_and_probe_metadata_record_the_choice():
    model, batches = conv_bn_case()
    res = hessian_spectrum(model, batches, top_k=2, tol=1e-6)
    choice = res.meta["path_choice"]
    assert choice["requested"] == "auto" and choice["chosen"]["1"] in AUTODIFF_PATHS
    assert set(choice["seconds_per_vector"]["1"]) == set(AUTODIFF_PATHS)
    assert all(t > 0 for t in choice["seconds_per_vector"]["1"].values())
    assert json.loads(json.dumps(choice)) == choice
    base._CHOICES.clear()  # decide afresh from this operator's own timings
    op = HessianOperator(model, batches)
    for _ in range(3):
        op @ vectors(op.num_params, 1)
    fastest = min(AUTODIFF_PATHS, key=lambda p: op.path_timings[1][p])
    assert op.chosen_path[1] == fastest  # the real clock, no budget pressure: the faster one
    assert op.path_report()["chosen"] == {"1": fastest}


def test_double_backward_extra_memory_counts_its_cached_graphs():
    model, batches = conv_bn_case()
    op = HessianOperator(model, batches)
    op @ vectors(op.num_params, 1)
    assert op._graph_bytes > 0 and op.path_memory[1][DB] >= op._graph_bytes


def test_peak_memory_meter_sees_a_known_allocation():
    n = 16 * 2**20 // 8  # 16 MiB of float64
    with _PeakMemory(torch.device("cpu")) as meter:
        x = torch.ones(n, dtype=DT)  # written, so its pages are resident
        del x
    if meter.base is None:
        pytest.skip("no /proc/self resident-set accounting on this system")
    # Linux batches per-thread resident-page counts (up to 64 pages per thread): 15 MiB, not 16, as the floor
    assert 15 * 2**20 <= meter.extra <= 64 * 2**20


@pytest.mark.parametrize("bad", [0, -1, "1GB", True])
def test_bad_memory_budget_raises(bad):
    model, batches = conv_bn_case()
    with pytest.raises(ValueError, match="memory_budget"):
        HessianOperator(model, batches, memory_budget=bad)
