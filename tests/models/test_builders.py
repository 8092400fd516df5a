"""Configuration-only model specs (Hugging Face Auto classes, timm, torchvision) and factories found in the cwd."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
from torch import nn

from lossatlas import trust
from lossatlas.analysis.runner import load_model
from lossatlas.curvature import make_operator
from lossatlas.errors import UserError
from lossatlas.importer import import_checkpoints
from lossatlas.models import build_data, build_model, builders, normalize_spec, spec_fingerprint
from lossatlas.store.runfile import RunReader, RunWriter

import reference as ref

GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 50, "n_positions": 16}
HF = {"hf": {"auto_class": "AutoModelForCausalLM", "config": GPT2}, "seed": 3}


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_hf_spec_builds_the_configured_model_with_weights_fixed_by_the_seed():
    transformers = pytest.importorskip("transformers")
    model = build_model(HF)
    assert isinstance(model, transformers.GPT2LMHeadModel)
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == (1, 16, 2)
    assert model.transformer.wte.weight.shape == (50, 16) and model.transformer.wpe.weight.shape == (16, 16)
    state = torch.random.get_rng_state()
    assert same_weights(model, build_model(HF))
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched
    assert not same_weights(model, build_model({**HF, "seed": 4}))
    out = model(torch.tensor([[1, 2, 3]]))  # returned as-is: a ModelOutput with logits
    assert out.logits.shape == (1, 3, 50)


def test_hf_spec_canonical_form_and_fingerprint():
    canon = normalize_spec(HF)
    assert canon == {"hf": {"auto_class": "AutoModelForCausalLM", "config": GPT2}, "kwargs": {}, "seed": 3}
    assert normalize_spec(canon) == canon
    reordered = {"seed": 3, "hf": {"config": dict(reversed(list(GPT2.items()))), "auto_class": "AutoModelForCausalLM"}}
    assert spec_fingerprint(reordered) == spec_fingerprint(HF)
    assert spec_fingerprint({**HF, "seed": 4}) != spec_fingerprint(HF)


def test_hf_spec_round_trips_through_a_run_file_without_trust(tmp_path):
    pytest.importorskip("transformers")
    model = build_model(HF)
    path = tmp_path / "run.h5"
    with RunWriter(path, model_spec=normalize_spec(HF)) as w:
        w.write_checkpoint(0, dict(model.named_parameters()), dict(model.named_buffers()))
    reader = RunReader(path)
    assert isinstance(reader.model_spec, trust.StoredSpec) and not reader.model_spec.signed
    assert normalize_spec(reader.model_spec) == normalize_spec(HF)
    rebuilt = build_model(reader.model_spec)  # no trust_factory: nothing of the user's is imported
    rebuilt.load_state_dict(reader.checkpoint(0).state_dict(), strict=False)
    assert same_weights(model, rebuilt)


@pytest.mark.parametrize("hf, needle", [
    ({"auto_class": "GPT2LMHeadModel", "config": GPT2}, "AutoModel"),
    ({"auto_class": "AutoTokenizer", "config": GPT2}, "AutoModel"),
    ({"auto_class": "AutoModelForCausalLM", "config": {**GPT2, "trust_remote_code": True}}, "remote code"),
    ({"auto_class": "AutoModelForCausalLM", "config": {**GPT2, "auto_map": {"AutoModel": "x.y"}}}, "remote code"),
    ({"auto_class": "AutoModelForCausalLM", "config": GPT2, "trust_remote_code": True}, "auto_class"),
    ({"auto_class": "AutoModelForCausalLM", "config": {"n_layer": 1}}, "model_type"),
])
def test_bad_hf_specs_are_refused_in_one_line(hf, needle):
    with pytest.raises(UserError, match=needle) as err:
        build_model({"hf": hf})
    assert "\n" not in str(err.value)


def test_hf_auto_class_that_transformers_lacks_and_unknown_model_type():
    pytest.importorskip("transformers")
    with pytest.raises(UserError, match="no Auto class 'AutoModelForNothing'"):
        build_model({"hf": {"auto_class": "AutoModelForNothing", "config": GPT2}})
    with pytest.raises(UserError, match="model_type 'no-such-model'"):
        build_model({"hf": {"auto_class": "AutoModel", "config": {"model_type": "no-such-model"}}})


def test_config_specs_build_models_only():
    with pytest.raises(UserError, match="builds a model, not data"):
        build_data(HF)


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_missing_library_says_how_to_install_it(library, monkeypatch):
    monkeypatch.setitem(sys.modules, library, None)  # an import of it raises ImportError
    with pytest.raises(UserError, match=f"pip install {library}$"):
        build_model({library: "resnet18"})


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_a_library_built_for_another_torch_is_refused_in_one_line(library, monkeypatch):
    def broken(name, *args, **kwargs):  # what torchvision's CUDA wheel does on a CPU torch build
        raise RuntimeError("operator torchvision::nms does not exist\nmore lines")

    monkeypatch.setattr(builders.importlib, "import_module", broken)
    with pytest.raises(UserError, match=f"needs {library}, which does not work with the installed torch .*"
                                        "torchvision::nms does not exist") as err:
        build_model({library: "resnet18"})
    assert "\n" not in str(err.value)


def real_library(name):
    """The installed library, or a skip saying why it cannot be used here."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.skip(f"{name} is not installed ({exc}); pip install {name}")
    except RuntimeError as exc:  # e.g. torchvision's CUDA wheel on a CPU torch: "operator torchvision::nms ..."
        pytest.skip(f"{name} does not work with torch {torch.__version__}: {str(exc).splitlines()[0]}")


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_real_resnet18_builds_imports_and_has_the_exact_hvp(library, tmp_path):
    real_library(library)
    spec = {library: "resnet18", "kwargs": {"num_classes": 3}, "seed": 0}
    model = build_model(spec).eval()
    assert same_weights(model, build_model(spec)) and not same_weights(model, build_model({**spec, "seed": 1}))
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 3)
    torch.save(model.state_dict(), tmp_path / "ckpt_5.pt")
    assert import_checkpoints([tmp_path / "ckpt_5.pt"], tmp_path / "run.h5", model_spec=spec,
                              loss="cross_entropy") == [5]
    with RunReader(tmp_path / "run.h5") as r:
        rebuilt = load_model(r, 5).eval()
    assert same_weights(model, rebuilt)  # BatchNorm running statistics included
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, 3, 16, 16, generator=gen), torch.tensor([0, 2, 1])),
            (torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([1, 1]))]
    names = [n for n, _ in rebuilt.named_parameters() if n.startswith(("fc.", "layer4.1."))]
    op = make_operator("hessian", rebuilt, data, "cross_entropy", params=names, dtype=torch.float64)
    v = torch.randn(op.num_params, dtype=torch.float64, generator=gen)
    # the reference: double backward on a float64 copy, L = (1/N) Σ_i ℓ_i over the N = 5 examples
    plain = build_model(spec).double().eval()
    plain.load_state_dict({k: t.double() if t.is_floating_point() else t for k, t in model.state_dict().items()})
    params = dict(plain.named_parameters())
    theta = [params[n] for n in op.param_names]
    loss = sum(torch.nn.functional.cross_entropy(plain(x.double()), y, reduction="sum") for x, y in data) / 5
    grads = torch.autograd.grad(loss, theta, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    expected = torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat @ v, theta)])
    ref.close(op @ v, expected, rtol=1e-10)


def test_timm_and_torchvision_specs_call_their_builders_without_weights(monkeypatch):
    calls = []

    def make(name, **kwargs):
        calls.append((name, kwargs))
        return nn.Linear(kwargs.get("num_classes", 1), 2)

    timm = types.SimpleNamespace(is_model=lambda n: n == "resnet18", create_model=make)
    tv = types.SimpleNamespace(models=types.SimpleNamespace(list_models=lambda: ["resnet18"], get_model=make))
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    a = build_model({"timm": "resnet18", "kwargs": {"num_classes": 3}, "seed": 1})
    b = build_model({"torchvision": "resnet18", "kwargs": {"num_classes": 3}, "seed": 1})
    assert calls == [("resnet18", {"pretrained": False, "num_classes": 3}), ("resnet18", {"weights": None, "num_classes": 3})]
    assert same_weights(a, b)  # both seeded with 1
    with pytest.raises(UserError, match="has no model 'resnet999'"):
        build_model({"timm": "resnet999"})
    with pytest.raises(UserError, match="downloads no weights"):
        build_model({"torchvision": "resnet18", "kwargs": {"weights": "DEFAULT"}})
    assert normalize_spec({"timm": "resnet18", "kwargs": {"seed": 2}}) == {"timm": "resnet18", "kwargs": {}, "seed": 2}


def test_two_sources_are_refused():
    with pytest.raises(UserError, match="exactly one"):
        normalize_spec({"name": "mlp", "timm": "resnet18"})


def test_config_specs_from_a_file_need_no_trust():
    stored = trust.StoredSpec(HF, role="model", source="run.h5")
    trust.require_trusted(stored)  # no UserError
    with pytest.raises(UserError, match="--trust-factory"):
        trust.require_trusted(trust.StoredSpec({"factory": "m:f"}, role="model", source="run.h5"))


def test_a_factory_module_in_the_working_directory_is_found(tmp_path, monkeypatch):
    module = "lossatlas_test_cwd_factory"
    (tmp_path / f"{module}.py").write_text("import torch\n\ndef build(width):\n    return torch.nn.Linear(width, 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, module, raising=False)
    path_before = list(sys.path)
    model = build_model({"factory": f"{module}:build", "kwargs": {"width": 5}})
    assert isinstance(model, nn.Linear) and model.in_features == 5
    assert sys.path == path_before  # the working directory was on sys.path for the import only
    sys.modules.pop(module, None)
    stored = trust.StoredSpec({"factory": f"{module}:build", "kwargs": {"width": 5}}, role="model", source="run.h5")
    with pytest.raises(UserError, match="--trust-factory"):  # untrusted: refused before any import
        build_model(stored)
    assert module not in sys.modules
