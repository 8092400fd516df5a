"""Curvature products of models whose attention runs through fused kernels without second-order autodiff.

torch's fused scaled_dot_product_attention (flash on CPU) has neither double backward nor forward-mode
AD; the operators run their products under the math SDPA backend. References: the dense float64
Hessian/GGN of reference.py, and plain autograd HVPs, both computed under the math backend.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lossatlas.curvature import GGNOperator, HessianOperator

import reference

DT = torch.float64
PATHS = ("double_backward", "forward_over_reverse")


close = reference.close


class SDPABlock(nn.Module):
    """Embedding, two causal heads through F.scaled_dot_product_attention, unembedding."""

    def __init__(self, vocab=5, d=4, heads=2, backend_dependent=False):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, vocab)
        self.backend_dependent = backend_dependent  # double the logits when the flash backend is off (a backend-dependent model)

    def forward(self, idx):  # (B, T) -> (B, T, vocab)
        h = self.emb(idx)
        B, T, d = h.shape
        q, k, v = (t.reshape(B, T, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(h).chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        logits = self.out(h + a)
        if self.backend_dependent and not torch.backends.cuda.flash_sdp_enabled():
            logits = 2.0 * logits
        return logits


def token_batches(vocab=5, T=4, sizes=(3, 5)):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, vocab, (n, T), generator=g), torch.randint(0, vocab, (n, T), generator=g))
            for n in sizes]


def sdpa_model(**kw):
    torch.manual_seed(0)
    return SDPABlock(**kw).to(DT).eval()


def test_default_backend_has_no_second_order_autodiff():
    """The premise: plain double backward through the default (fused) kernel fails."""
    model, (x, y) = sdpa_model(), token_batches()[0]
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    (g,) = torch.autograd.grad(loss, [model.qkv.weight], create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), [model.qkv.weight])


@pytest.mark.parametrize("path", PATHS)
def test_hessian_and_ggn_of_an_sdpa_model_match_dense_references(path):
    model, batches = sdpa_model(), token_batches()
    with sdpa_kernel(SDPBackend.MATH):
        H = reference.hessian(model, batches, "cross_entropy")
        G = reference.ggn(model, batches, "cross_entropy")
    V = torch.randn(H.shape[0], 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    h_op = HessianOperator(model, batches, "cross_entropy", path=path)
    g_op = GGNOperator(model, batches, "cross_entropy", path=path)
    close(h_op @ V, H @ V)
    close(g_op @ V, G @ V)
    assert h_op.path == path and g_op.path == path  # no fallback was needed
    assert h_op.attention_backend == "math" and h_op.calls_attention is True


def test_loss_is_the_default_backends_and_a_backend_dependent_model_is_refused():
    model, batches = sdpa_model(), token_batches()
    loss, grad = HessianOperator(model, batches, "cross_entropy").loss_and_gradient()
    assert loss == pytest.approx(reference.loss_value(model, batches, "cross_entropy"), rel=1e-12)
    close(grad, reference.gradient(model, batches, "cross_entropy"))
    shifted = sdpa_model(backend_dependent=True)
    op = HessianOperator(shifted, batches, "cross_entropy")
    with pytest.raises(ValueError, match="math"):
        op.loss_and_gradient()


def test_a_model_without_attention_is_noted_as_such():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x = torch.randn(6, 3, dtype=DT)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    op = HessianOperator(model, [(x, y)], "cross_entropy")
    V = torch.randn(op.num_params, 2, dtype=DT)
    close(op @ V, reference.hessian(model, [(x, y)], "cross_entropy") @ V)
    assert op.calls_attention is False


def test_hessian_probe_records_the_math_backend():
    from lossatlas.probes.hessian import hessian_spectrum

    model, batches = sdpa_model(), token_batches()
    with sdpa_kernel(SDPBackend.MATH):
        top = float(reference.eigenvalues(reference.hessian(model, batches, "cross_entropy"), descending=True)[0])
    res = hessian_spectrum(model, batches, "cross_entropy", top_k=1)
    assert res.meta["attention_backend"] == "math"
    assert float(res.values["top_eigenvalues"][0]) == pytest.approx(top, rel=1e-6)


class Logits(nn.Module):
    """A Hugging Face causal LM as a module returning its logits."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, idx):
        return self.lm(idx).logits


def test_tiny_gpt2_with_sdpa_attention_matches_autograd_hvps():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    lm = transformers.GPT2LMHeadModel(config)
    assert lm.config._attn_implementation == "sdpa"
    model = Logits(lm).to(DT).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 50, (n, 8), generator=g), torch.randint(0, 50, (n, 8), generator=g)) for n in (2, 3)]
    names = [n for n, _ in model.named_parameters()]
    f, theta = reference.loss_function(model, batches, "cross_entropy", names=names)
    theta = theta.clone().requires_grad_(True)
    V = torch.randn(theta.numel(), 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    with sdpa_kernel(SDPBackend.MATH):
        (grad,) = torch.autograd.grad(f(theta), theta, create_graph=True)
        want = torch.stack([torch.autograd.grad(grad, theta, V[:, k], retain_graph=True)[0] for k in range(2)], 1)
    for path in PATHS:
        op = HessianOperator(model, batches, "cross_entropy", path=path)
        close(op @ V, want)
        assert op.path == path and op.attention_backend == "math" and op.calls_attention is True
    # the loss the operator reports is the default backend's
    assert op.loss_and_gradient()[0] == pytest.approx(reference.loss_value(model, batches, "cross_entropy"), rel=1e-12)
