"""The loss "model" (a model's own loss from the labels its inputs keep), named outputs, and regrouping of dict batches."""

from __future__ import annotations

import pytest
import torch
from test_outputs import TinyCausalLM, lm_batches
from torch import nn

import lossatlas
from lossatlas.batches import as_batches, batch_length, inputs_signature, num_examples, take
from lossatlas.curvature import GGNOperator, HessianOperator
from lossatlas.errors import UserError
from lossatlas.losses import batch_count, data_loss, model_loss_batches, shifts_labels
from lossatlas.outputs import model_outputs, output_of, use_output, using_output
from lossatlas.probes.batch_scan import minibatches
from lossatlas.probes.hessian_ci import bootstrap_batches
from lossatlas.probes.sharpness import chunk_batches

DT = torch.float64


class TinyForCausalLM(TinyCausalLM):
    """TinyCausalLM that also returns its own loss, as a Hugging Face causal LM does: the shifted, -100-ignoring mean."""

    def forward(self, input_ids, attention_mask=None, labels=None):
        out = super().forward(input_ids, attention_mask)
        if labels is not None:
            logits, target = out["logits"][:, :-1], labels[:, 1:]
            out["loss"] = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                      ignore_index=-100)
        return out


@torch.no_grad()
def token_mean_by_brute_force(model, batches, chosen):
    """Mean next-token cross-entropy over the counted tokens of the chosen (batch, row) sequences, one at a time."""
    terms = []
    for b, i in chosen:
        x = batches[b]
        ids, mask = x["input_ids"][i : i + 1], x["attention_mask"][i : i + 1]
        logits = model_outputs(model, {"input_ids": ids, "attention_mask": mask})[0]
        for t in range(ids.shape[1] - 1):
            label = int(x["labels"][i, t + 1])
            if label != -100 and int(mask[0, t + 1]):
                terms.append(-torch.log_softmax(logits[t], -1)[label])
    return torch.stack(terms).mean()


def test_model_loss_equals_causal_lm_with_its_own_weights_and_products():
    torch.manual_seed(0)
    model = TinyForCausalLM().double().eval()
    assert shifts_labels(model) and not shifts_labels(TinyCausalLM())
    data = lm_batches(11)
    ours = as_batches(data)
    theirs = model_loss_batches(model, as_batches(data, keep_labels=True))
    assert [batch_count("model", y) for _, y in theirs] == [batch_count("causal_lm", y) for _, y in ours]
    assert torch.equal(theirs[0][0]["labels"][:, 0], data[0]["labels"][:, 0])  # the model's labels are untouched
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=DT, generator=torch.Generator().manual_seed(2))
    for path in ("double_backward", "forward_over_reverse"):
        H = HessianOperator(model, ours, "causal_lm", path=path)
        (la, ga), HV = H.loss_and_gradient(), H @ V  # before the model's output becomes its loss
        with using_output(model, "loss"):
            M = HessianOperator(model, theirs, "model", path=path)
            lb, gb = M.loss_and_gradient()
            assert lb == pytest.approx(la, rel=1e-12) and torch.allclose(gb, ga, rtol=1e-10, atol=1e-14)
            assert torch.allclose(M @ V, HV, rtol=1e-10, atol=1e-13)
            with pytest.raises(ValueError, match="--curvature ggn.*--loss causal_lm"):
                GGNOperator(model, theirs, "model")
    assert output_of(model) == "logits"
    # the notebook function takes one dict batch too, and leaves the module as it was
    res = lossatlas.loss(model, data[1], "model")
    assert res.scalar("loss") == pytest.approx(float(token_mean_by_brute_force(model, data, [(1, 0), (1, 1), (1, 2)])),
                                               rel=1e-12)
    assert res.meta["output"] == "loss" and output_of(model) == "logits"


def test_take_regroups_unequal_sequences_without_changing_the_token_mean():
    torch.manual_seed(0)
    model = TinyCausalLM().double().eval()
    data = lm_batches(11)
    batches = as_batches(data)
    index = [5, 0, 5, 3, 1]  # repeats, across the batches of lengths 5, 7 and 4: three shapes
    groups = take(batches, index)
    assert [batch_length(x) for x, _ in groups] == [2, 2, 1] and num_examples(groups) == 5
    assert all(len({inputs_signature(x)}) == 1 for x, _ in groups)
    got = data_loss("causal_lm", lambda x: model_outputs(model, x), groups)
    flat = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0)]
    ref = token_mean_by_brute_force(model, data, [flat[i] for i in index])
    assert float(got) == pytest.approx(float(ref), rel=1e-12)
    # one shape: the concatenation indexed, as before
    x, y = torch.randn(7, 3), torch.arange(7)
    (only,) = take([(x[:4], y[:4]), (x[4:], y[4:])], [6, 2, 2])
    assert torch.equal(only[0], x[[6, 2, 2]]) and torch.equal(only[1], y[[6, 2, 2]])


def test_resampling_probes_keep_every_example_of_dict_batches():
    batches = as_batches(lm_batches(11))
    n = num_examples(batches)
    boot = bootstrap_batches(batches, torch.Generator().manual_seed(0))
    assert num_examples(boot) == n and all(batch_length(x) <= 3 for x, _ in boot)
    scans = minibatches(batches, 4, 1, torch.Generator().manual_seed(0))
    assert [num_examples(mb) for mb in scans] == [4]
    chunks = chunk_batches(batches, 4, 2)
    assert [num_examples(c) for c in chunks] == [4, 2] and all(batch_length(x) <= 2 for c in chunks for x, _ in c)


def test_named_outputs_are_used_or_refused_in_one_line():
    class Two(nn.Module):
        def forward(self, x):
            return {"start_logits": x + 1, "end_logits": x - 1}

    model, x = Two(), torch.zeros(2, 3)
    with using_output(model, "end_logits"):
        assert torch.equal(model_outputs(model, x), x - 1)
    assert output_of(model) == "logits"
    use_output(model, "start_logits")
    assert torch.equal(model_outputs(model, x), x + 1)
    use_output(model, None)
    with pytest.raises(UserError, match="no tensor 'middle'"):
        model_outputs(model, x, output="middle")
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(UserError, match="no names"):
        model_outputs(Pair(), x, output="start_logits")
    with pytest.raises(UserError, match="without a 'loss'"):
        model_outputs(model, x, output="loss")
    with pytest.raises(UserError, match="output must name"):
        use_output(model, "bad name!")
