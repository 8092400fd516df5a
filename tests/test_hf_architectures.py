"""More Hugging Face architectures: import of their save_pretrained folders, and exact float64 HVPs with SDPA.

Tiny random-init models built from configs with fused attention requested (``attn_implementation="sdpa"``):
a Llama-style decoder (grouped-query attention, RMSNorm, rotary positions), a BERT sequence classifier
and a ViT image classifier. Each is saved with ``save_pretrained``, imported (every tensor bit for bit,
the model rebuilt from config.json alone), and the curvature operator's Hessian-vector products on the
rebuilt model, in float64 over dict batches of unequal sizes with padding, equal a double-backward HVP
computed here with plain autograd on an eager-attention copy of the model:

    H v = ∇_θ (∇_θ L(θ) · v),  L = (1/N) Σ_i ℓ_i  over the N counted terms (tokens or examples).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

transformers = pytest.importorskip("transformers", reason="Hugging Face models need transformers installed")

from safetensors.torch import load_file  # noqa: E402

from lossatlas.analysis.runner import load_model  # noqa: E402
from lossatlas.cli import main  # noqa: E402
from lossatlas.curvature import make_operator  # noqa: E402
from lossatlas.store import RunReader  # noqa: E402

import reference as ref  # noqa: E402

SMALL = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
         "initializer_range": 0.3}  # large initial weights: attention far from uniform, curvature far from 0
ARCHS = {
    "llama": ("LlamaConfig", "AutoModelForCausalLM", "causal_lm",
              {**SMALL, "vocab_size": 32, "num_key_value_heads": 1, "max_position_embeddings": 16}),
    "bert": ("BertConfig", "AutoModelForSequenceClassification", "cross_entropy",
             {**SMALL, "vocab_size": 32, "max_position_embeddings": 16, "num_labels": 3}),
    "vit": ("ViTConfig", "AutoModelForImageClassification", "cross_entropy",
            {**SMALL, "image_size": 8, "patch_size": 4, "num_channels": 3, "num_labels": 3}),
}
# The reference's attention: eager where it is float64 throughout; Llama's and ViT's eager attention take their
# softmax in float32 (a 1e-7 relative error), so their reference is the SDPA model itself under the math backend.
REFERENCE_ATTENTION = {"llama": "sdpa", "bert": "eager", "vit": "sdpa"}


def build(arch, attention, seed=0):
    config_cls, auto_class, _, kwargs = ARCHS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**kwargs)
    return getattr(transformers, auto_class).from_config(config, attn_implementation=attention).eval()


def batches(arch):
    """Two dict batches of 3 and 2 examples; text batches right-padded (attention_mask 0 at the end)."""
    gen = torch.Generator().manual_seed(5)
    out = []
    for b, pad in ((3, [0, 2, 1]), (2, [3, 0])):
        if arch == "vit":
            out.append({"pixel_values": torch.randn(b, 3, 8, 8, generator=gen),
                        "labels": torch.randint(0, 3, (b,), generator=gen)})
            continue
        ids = torch.randint(0, 32, (b, 6), generator=gen)
        mask = torch.ones(b, 6, dtype=torch.long)
        for i, p in enumerate(pad):
            mask[i, 6 - p:] = 0
        labels = ids.clone() if arch == "llama" else torch.randint(0, 3, (b,), generator=gen)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def reference_loss(model, data, loss):
    """L = Σ counted ℓ / N written out: next-token CE over unpadded targets, or CE per example."""
    total, count = 0.0, 0
    for batch in data:
        inputs = {k: v.double() if v.is_floating_point() else v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        if loss == "causal_lm":
            keep = batch["attention_mask"][:, 1:].bool()  # target t+1 of position t counts where it is a real token
            terms = F.cross_entropy(logits[:, :-1][keep], batch["labels"][:, 1:][keep], reduction="sum")
            count += int(keep.sum())
        else:
            terms = F.cross_entropy(logits, batch["labels"], reduction="sum")
            count += len(batch["labels"])
        total = total + terms
    return total / count


def reference_hvp(model, data, loss, names, vectors):
    """H V by double backward on ``model`` (float64), V as (P, K) in ``names`` order."""
    params = dict(model.named_parameters())
    theta = [params[n] for n in names]
    grads = torch.autograd.grad(reference_loss(model, data, loss), theta, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    cols = [torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat @ v, theta, retain_graph=True)])
            for v in vectors.T]
    return torch.stack(cols, dim=1).detach()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_save_pretrained_round_trips_and_sdpa_hvp_equals_double_backward(arch, tmp_path, capfd):
    config_cls, auto_class, loss, _ = ARCHS[arch]
    model = build(arch, "sdpa")
    assert model.config._attn_implementation == "sdpa"  # the fused attention is what the model calls
    folder = tmp_path / arch
    model.save_pretrained(folder)
    out = tmp_path / "run.h5"
    capfd.readouterr()
    assert main(["import", str(folder), "-o", str(out), "--loss", loss]) == 0
    err = capfd.readouterr().err.splitlines()
    assert all(line.startswith("lossatlas: ") for line in err), err  # transformers' own logs and bars silenced
    # transformers 5 saves ViT under its original key names and renames them on load: so does the import
    assert any("renamed the checkpoint's keys" in line for line in err) == (arch == "vit")
    with RunReader(out) as r:
        assert r.model_spec["hf"]["auto_class"] == auto_class
        back = r.checkpoint(0).state_dict()
        rebuilt = load_model(r, 0).eval()
    expected = model.state_dict()
    assert set(back) == set(expected)
    for k, v in expected.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    on_disk = load_file(str(folder / "model.safetensors"))  # ViT's file keeps its original key names
    if arch == "vit":
        assert set(on_disk) != set(back)
    assert sorted(bytes(v.numpy()) for v in on_disk.values()) == sorted(bytes(v.numpy()) for v in back.values())
    assert type(rebuilt) is type(model) and rebuilt.config._attn_implementation == "sdpa"
    data = batches(arch)
    with torch.no_grad():
        x = {k: v for k, v in data[0].items() if k != "labels"}
        assert torch.equal(rebuilt(**x).logits, model(**x).logits)

    op = make_operator("hessian", rebuilt, data, loss, dtype=torch.float64)
    V = torch.randn(op.num_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    HV = op @ V
    assert op.calls_attention and op.attention_backend == "math"
    plain = build(arch, REFERENCE_ATTENTION[arch], seed=1).double()  # other random weights, then the checkpoint's
    plain.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in back.items()})
    with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no double backward
        expected_hv = reference_hvp(plain, data, loss, op.param_names, V)
        with torch.no_grad():
            expected_loss = float(reference_loss(plain, data, loss))
    ref.close(HV, expected_hv, rtol=1e-10)
    assert op.loss_and_gradient()[0] == pytest.approx(expected_loss, rel=1e-12)
