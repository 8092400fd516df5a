"""Model outputs of every kind, dict batches and the causal_lm loss against a brute force on the concatenated tokens."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import lossatlas
from lossatlas.batches import as_batches, fingerprint
from lossatlas.curvature import GGNOperator, HessianOperator
from lossatlas.errors import UserError
from lossatlas.losses import batch_count, data_loss, per_example_loss
from lossatlas.outputs import model_outputs

DT = torch.float64


# ------------------------------------------------------------------------------------------------- output kinds
class Wrapped(nn.Module):
    """An MLP whose forward returns its logits as a tensor, a tuple, a dict or a ModelOutput."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))

    def forward(self, x):
        logits = self.net(x)
        if self.kind == "tuple":
            return logits, logits.sum()
        if self.kind == "dict":
            return {"hidden": x, "logits": logits}
        if self.kind == "single":
            return {"scores": logits}
        if self.kind == "model_output":
            from transformers.modeling_outputs import SequenceClassifierOutput

            return SequenceClassifierOutput(logits=logits)
        return logits


@pytest.mark.parametrize("kind", ["tuple", "dict", "single", "model_output"])
def test_every_output_kind_gives_the_tensor_models_loss_and_products(kind):
    if kind == "model_output":
        pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    plain = Wrapped("tensor").double()
    other = Wrapped(kind).double()
    other.load_state_dict(plain.state_dict())
    x = torch.randn(10, 3, dtype=DT)
    data = [(x[:6], torch.randint(0, 4, (6,))), (x[6:], torch.randint(0, 4, (4,)))]
    V = torch.randn(sum(p.numel() for p in plain.parameters()), 3, dtype=DT)
    for Op in (HessianOperator, GGNOperator):
        a, b = Op(plain, data, "cross_entropy"), Op(other, data, "cross_entropy")
        (la, ga), (lb, gb) = a.loss_and_gradient(), b.loss_and_gradient()
        assert la == lb and torch.equal(ga, gb)
        assert torch.equal(a @ V, b @ V)
    assert lossatlas.loss(other, data).scalar("loss") == pytest.approx(lossatlas.loss(plain, data).scalar("loss"))


def test_an_output_without_logits_is_a_user_error():
    class Two(nn.Module):
        def forward(self, x):
            return {"a": x, "b": x}

    with pytest.raises(UserError, match="logits"):
        model_outputs(Two(), torch.zeros(2, 3))
    assert torch.equal(model_outputs(Two(), torch.ones(2, 3), output="b"), torch.ones(2, 3))


# ------------------------------------------------------------------------------------------------- dict batches
class TinyCausalLM(nn.Module):
    """Embeddings, a causal masked running mean of the previous positions, a tanh and a linear head."""

    def __init__(self, vocab: int = 11, width: int = 6):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        m = torch.ones_like(input_ids, dtype=h.dtype) if attention_mask is None else attention_mask.to(h.dtype)
        seen = (h * m.unsqueeze(-1)).cumsum(1) / m.cumsum(1).clamp(min=1).unsqueeze(-1)
        return {"logits": self.head(torch.tanh(h + self.mix(seen))), "past": h}


def lm_batches(vocab: int, seed: int = 0) -> list[dict]:
    """Three dict batches of unequal lengths and token counts, with right padding and -100 labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, t, pads in ((2, 5, (0, 2)), (3, 7, (1, 0, 4)), (1, 4, (0,))):
        ids = torch.randint(0, vocab, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        for i, p in enumerate(pads):
            if p:
                mask[i, t - p :] = 0
        labels = ids.clone()
        labels[0, 2] = -100  # a position the user excludes
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def brute_force_loss(model: nn.Module, batches: list[dict], theta: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every counted token of every batch, as one flat list of tokens."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    params, start = {}, 0
    for n, s in zip(names, shapes):
        k = int(torch.tensor(s).prod()) if len(s) else 1
        params[n] = theta[start : start + k].reshape(s)
        start += k
    terms = []
    for batch in batches:
        logits = functional_call(model, params, (), {"input_ids": batch["input_ids"],
                                                     "attention_mask": batch["attention_mask"]})
        logits = logits["logits"] if isinstance(logits, dict) else logits.logits
        B, T = batch["input_ids"].shape
        for i in range(B):
            for t in range(T - 1):
                target = int(batch["labels"][i, t + 1])
                if target != -100 and int(batch["attention_mask"][i, t + 1]) == 1:
                    terms.append(-torch.log_softmax(logits[i, t], dim=-1)[target])
    return torch.stack(terms).mean()


def check_against_brute_force(model: nn.Module, batches: list[dict], dense: bool) -> None:
    model = model.double().eval()
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_(True)
    ref = brute_force_loss(model, batches, theta)
    (ref_grad,) = torch.autograd.grad(ref, theta, create_graph=True)
    V = torch.randn(theta.numel(), 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    ref_hv = torch.stack([torch.autograd.grad(ref_grad @ V[:, k], theta, retain_graph=True)[0] for k in range(3)], 1)
    if dense:  # the whole Hessian, column by column
        eye = torch.eye(theta.numel(), dtype=DT)
        ref_H = torch.stack([torch.autograd.grad(ref_grad @ e, theta, retain_graph=True)[0] for e in eye], 1)
        assert torch.allclose(ref_H @ V, ref_hv, atol=1e-12)
    for path in ("double_backward", "forward_over_reverse"):
        H = HessianOperator(model, batches, "causal_lm", path=path)
        loss, grad = H.loss_and_gradient()
        assert loss == pytest.approx(float(ref.detach()), rel=1e-12)
        assert torch.allclose(grad, ref_grad.detach(), atol=1e-12, rtol=1e-10)
        assert torch.allclose(H @ V, ref_hv, atol=1e-11, rtol=1e-9)
        assert H.path == path
    # a batch's weight is its count of counted tokens, not its example count
    prepared = as_batches(batches)
    counts = [batch_count("causal_lm", y) for _, y in prepared]
    assert counts == [int(((b["labels"][:, 1:] != -100) & (b["attention_mask"][:, 1:] == 1)).sum()) for b in batches]
    direct = data_loss("causal_lm", lambda x: model_outputs(model, x), prepared)
    assert float(direct) == pytest.approx(float(ref), rel=1e-12)
    assert lossatlas.loss(model, batches, "causal_lm").scalar("loss") == pytest.approx(float(ref), rel=1e-12)
    spec = lossatlas.hessian_spectrum(model, batches, "causal_lm", top_k=2, seed=0)
    eigs = spec.values["top_eigenvalues"]
    assert eigs.shape == (2,) and eigs[0] >= eigs[1]
    if dense:
        top = torch.linalg.eigvalsh(ref_H.detach())[-2:].flip(0)
        assert torch.allclose(torch.as_tensor(eigs, dtype=DT), top, rtol=1e-4, atol=1e-8)


def test_tiny_causal_lm_matches_the_brute_force_over_concatenated_tokens():
    torch.manual_seed(0)
    check_against_brute_force(TinyCausalLM(), lm_batches(11), dense=True)


def test_gpt2_matches_the_brute_force_over_concatenated_tokens():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                     attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config)
    check_against_brute_force(model, lm_batches(50), dense=False)


def test_dict_batches_drop_labels_mask_padding_and_count_examples():
    batches = lm_batches(11)
    prepared = as_batches(batches)
    x, y = prepared[0]
    assert set(x) == {"input_ids", "attention_mask"}
    assert torch.equal(y == -100, (batches[0]["labels"] == -100) | (batches[0]["attention_mask"] == 0))
    assert lossatlas.batches.num_examples(prepared) == 6
    assert len(as_batches(batches, limit=4)) == 2 and lossatlas.batches.num_examples(as_batches(batches, limit=4)) == 4
    assert fingerprint(prepared) != fingerprint(as_batches(lm_batches(11, seed=1)))

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {"input_ids": torch.arange(4) + i, "labels": torch.arange(4)}

    rows = as_batches(Rows(), batch_size=2)
    assert [tuple(x["input_ids"].shape) for x, _ in rows] == [(2, 4), (2, 4), (1, 4)]
    with pytest.raises(ValueError, match="labels"):
        as_batches([{"input_ids": torch.zeros(2, 3, dtype=torch.long)}])


def test_integer_sequence_labels_count_tokens_for_the_squared_losses():
    torch.manual_seed(0)
    outs = [torch.randn(2, 3, 4, dtype=DT), torch.randn(5, 3, 4, dtype=DT)]
    ys = [torch.randint(0, 4, (2, 3)), torch.randint(0, 4, (5, 3))]
    for name in ("mse", "half_sse"):
        assert [batch_count(name, y) for y in ys] == [6, 15]
        terms = torch.cat([per_example_loss(name, o, y) for o, y in zip(outs, ys)])
        assert terms.numel() == 21
        it = iter(outs)
        value = data_loss(name, lambda x, it=it: next(it), [(None, y) for y in ys])
        assert float(value) == pytest.approx(float(terms.mean()), rel=1e-12)
