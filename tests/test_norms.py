import math

import torch

from lossatlas.norms import NormRing


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 300), torch.nn.Tanh(), torch.nn.Linear(300, 3)).double()


def test_ring_norms_equal_a_per_tensor_loop_across_wraps():
    model = _model()
    params = list(model.parameters())
    ring = NormRing(params, chunk=64, budget_bytes=1)  # depth 1: a reduction every step
    ring_deep = NormRing(params, chunk=64, max_depth=3)  # wraps every 3 steps, drained mid-ring
    assert ring.depth == 1 and ring_deep.depth == 3
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 7, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64)
    expected, got = [], []
    prev = None
    for step in range(8):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if step == 5:
            params[3].grad = None  # a parameter without a gradient this step counts as zero
        opt.step()
        grads = [p.grad for p in params]
        ring.push()
        ring_deep.push()
        now = [p.detach().clone() for p in params]
        rows = [[0.0 if g is None else float(g.norm()) for g in grads], [float(w.norm()) for w in now],
                [math.nan] * len(now) if prev is None else [float((a - b).norm()) for a, b in zip(now, prev)]]
        expected.append(rows)
        prev = now
        if step == 4:
            got.append(ring_deep.drain())
    got.append(ring_deep.drain())
    expected = torch.tensor(expected, dtype=torch.float64)
    for out in (ring.drain(), torch.cat(got)):
        assert out.shape == (8, 3, 4) and out.dtype == torch.float64
        assert torch.isnan(out[0, 2]).all() and not torch.isnan(out[1:]).any()
        torch.testing.assert_close(out[1:], expected[1:], rtol=1e-12, atol=0)
        torch.testing.assert_close(out[0, :2], expected[0, :2], rtol=1e-12, atol=0)
    assert ring.drain() is None


def test_ring_keeps_float32_for_low_precision_weights_and_caps_memory():
    params = [torch.nn.Parameter(torch.randn(1000, 100).bfloat16())]
    ring = NormRing(params, budget_bytes=4 * 2**20)
    assert ring._weights.dtype == torch.float32
    assert ring._weights.numel() * 4 + ring._grads.numel() * 4 <= 4 * 2**20 + 2 * ring.width * 4
    params[0].grad = torch.ones_like(params[0])
    ring.push()
    out = ring.drain()
    assert abs(float(out[0, 0, 0]) - math.sqrt(1000 * 100)) < 1e-3 * math.sqrt(1e5)
    assert abs(float(out[0, 1, 0]) - float(params[0].detach().float().norm())) < 1e-4 * float(params[0].detach().float().norm())


# ---- StepNorms: the CPU path through the C helper ------------------------------------------
import os  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lossatlas import norms  # noqa: E402
from lossatlas.norms import StepNorms, norm_tracker  # noqa: E402

needs_c = pytest.mark.skipif(norms._fastnorms is None and not os.environ.get("LOSSATLAS_REQUIRE_FASTNORMS"),
                             reason="the C helper lossatlas._fastnorms is not built (no C compiler at install)")


def test_c_helper_is_built_where_required():
    """`make test` (and so CI) sets LOSSATLAS_REQUIRE_FASTNORMS: a broken build must fail, not skip."""
    if os.environ.get("LOSSATLAS_REQUIRE_FASTNORMS"):
        assert norms._fastnorms is not None


def _reference_rows(params, prev):
    """[‖g‖, ‖w‖, ‖w − prev‖] per tensor in float64 from the live tensors."""
    g = [0.0 if p.grad is None else float(p.grad.detach().to_dense().double().norm()) for p in params]
    w = [float(p.detach().double().norm()) for p in params]
    u = [math.nan] * len(params) if prev is None else [float((p.detach().double() - q).norm()) for p, q in zip(params, prev)]
    return [g, w, u]


def _run(model, tracker, steps, mutate=None, loss_fn=None):
    params = list(model.parameters())
    dtype = params[0].dtype
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    x = torch.randn(32, 7, dtype=dtype)
    expected, got, prev = [], [], None
    for step in range(steps):
        opt.zero_grad()
        (loss_fn(model, x) if loss_fn else (model(x) ** 2).mean()).backward()
        opt.step()
        if mutate is not None:
            mutate(step, params)
        tracker.push()
        expected.append(_reference_rows(params, prev))
        prev = [p.detach().double().clone() for p in params]
        if step == 2:
            got.append(tracker.drain())
    got.append(tracker.drain())
    return torch.cat(got), torch.tensor(expected, dtype=torch.float64)


@needs_c
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_step_norms_equal_a_float64_loop(dtype, rtol):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 300), torch.nn.Tanh(), torch.nn.Linear(300, 3)).to(dtype)
    tracker = norm_tracker(list(model.parameters()))
    assert isinstance(tracker, StepNorms)

    def drop_a_gradient(step, params):
        if step == 4:
            params[3].grad = None  # counts as zero

    out, expected = _run(model, tracker, 7, drop_a_gradient)
    assert out.shape == (7, 3, 4) and out.dtype == torch.float64
    assert torch.isnan(out[0, 2]).all() and not torch.isnan(out[1:]).any()
    assert out[4, 0, 3] == 0.0
    torch.testing.assert_close(out[1:], expected[1:], rtol=rtol, atol=0)
    torch.testing.assert_close(out[0, :2], expected[0, :2], rtol=rtol, atol=0)
    assert tracker.drain() is None


@needs_c
def test_step_norms_fall_back_for_strided_sparse_and_moved_tensors():
    """Tensors the C helper must not read (non-contiguous or sparse gradients, a replaced weight of
    another dtype) take the PyTorch loop for that step; the numbers stay exact."""
    torch.manual_seed(1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 5, sparse=True)
            self.lin = torch.nn.Linear(7, 5)

        def forward(self, x):
            return self.lin(x) + self.emb(torch.arange(x.shape[0]) % 10)

    model = Net().double()
    tracker = norm_tracker(list(model.parameters()))
    assert isinstance(tracker, StepNorms)
    calls = {"torch": 0}

    def count_fallbacks(tracker):
        real = tracker._torch_pass

        def counted():
            calls["torch"] += 1
            return real()

        tracker._torch_pass = counted

    count_fallbacks(tracker)

    def mutate(step, params):
        w = params[1]  # lin.weight (5, 7)
        if step == 2:  # a non-contiguous gradient
            w.grad = w.grad.t().contiguous().t()
            assert not w.grad.is_contiguous()
        if step == 4:  # the weight replaced by a copy at a new address: checked again, fast path
            w.data = w.data.clone()

    out, expected = _run(model, tracker, 6, mutate, loss_fn=lambda m, x: (m(x) ** 2).mean())
    assert calls["torch"] == 6  # the sparse embedding gradient sends every step to the loop
    torch.testing.assert_close(out[1:], expected[1:], rtol=1e-12, atol=0)

    dense = torch.nn.Sequential(torch.nn.Linear(7, 4)).double()
    tracker = norm_tracker(list(dense.parameters()))
    count_fallbacks(tracker)
    calls["torch"] = 0

    def strided(step, params):
        if step == 2:
            params[0].grad = params[0].grad.t().contiguous().t()
        if step == 4:
            params[0].data = params[0].data.clone()

    out, expected = _run(dense, tracker, 6, strided)
    assert calls["torch"] == 1  # only the step with the strided gradient
    assert tracker._checked[0] == dense[0].weight.data_ptr()  # the new address was checked and kept
    torch.testing.assert_close(out[1:], expected[1:], rtol=1e-12, atol=0)


def test_norm_tracker_picks_the_ring_where_the_c_pass_does_not_apply():
    bf16 = [torch.nn.Parameter(torch.randn(10, 10).bfloat16())]
    assert isinstance(norm_tracker(bf16), NormRing)
    mixed = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3).double())]
    assert not StepNorms.supports(mixed)
    assert norm_tracker([]) is None
    with pytest.raises(ValueError, match="NormRing"):
        StepNorms(bf16)


@needs_c
def test_step_norms_buffer_grows_past_its_first_rows():
    p = torch.nn.Parameter(torch.ones(4))
    tracker = StepNorms([p])
    for i in range(norms._ROWS + 5):
        p.grad = torch.full((4,), float(i))
        tracker.push()
    out = tracker.drain()
    assert out.shape == (norms._ROWS + 5, 3, 1)
    np.testing.assert_allclose(out[:, 0, 0].numpy(), 2.0 * np.arange(norms._ROWS + 5))
    np.testing.assert_allclose(out[:, 1, 0].numpy(), 2.0)
    assert math.isnan(float(out[0, 2, 0])) and float(out[1:, 2, 0].abs().max()) == 0.0
