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
