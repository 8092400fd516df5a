"""Every probe on a tiny random-init GPT-2 through the CLI, and ``--loss model`` (HF's own loss) against ``causal_lm``.

The run is written here: a GPT-2 from a config-only ``{"hf": ...}`` spec, three checkpoints with AdamW state,
and a data factory (a module in the working directory) of dict batches of unequal lengths with right padding
and a -100 label.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="the Hugging Face probes need transformers installed")

import lossatlas  # noqa: E402
import lossatlas.probes.registry  # noqa: E402, F401  (every probe registers itself)
from lossatlas.batches import as_batches  # noqa: E402
from lossatlas.cli import main  # noqa: E402
from lossatlas.curvature import HessianOperator  # noqa: E402
from lossatlas.losses import batch_count, model_loss_batches  # noqa: E402
from lossatlas.models import build_model  # noqa: E402
from lossatlas.outputs import use_output  # noqa: E402
from lossatlas.probes import PROBES  # noqa: E402
from lossatlas.store import ResultsStore, RunWriter  # noqa: E402

CONFIG = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 50, "n_positions": 16}
SPEC = {"hf": {"auto_class": "AutoModelForCausalLM", "config": CONFIG}}
MODULE = "hf_probe_tokens"  # the data factory's module, written into the run's folder
DATA = f'''import torch


def build(seed=0):
    """Three dict batches of unequal lengths and token counts, right padding and a -100 label."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, t, pads in ((2, 6, (0, 2)), (3, 8, (1, 0, 3)), (1, 5, (0,))):
        ids = torch.randint(0, {CONFIG["vocab_size"]}, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        for i, p in enumerate(pads):
            if p:
                mask[i, t - p:] = 0
        labels = ids.clone()
        labels[0, 2] = -100
        out.append({{"input_ids": ids, "attention_mask": mask, "labels": labels}})
    return out
'''
STEPS = (0, 10, 20)

# small settings per probe; every registered probe must be listed (a new probe fails the coverage test)
CASES = {
    "loss": [],
    "hessian": ["--top-k", "2", "--trace", "--trace-matvecs", "6", "--max-iter", "10"],
    "hessian_blocks": ["--block-k", "1", "--max-iter", "8"],
    "hessian_ci": ["--data-resamples", "2", "--max-iter", "8"],
    "adam_sharpness": ["--max-iter", "8"],
    "batch_scan": ["--batch-size-scan", "1", "2", "--scan-batches", "2", "--tol", "1e-3"],
    "sharpness": ["--m", "2", "--sharpness-steps", "2", "--num-samples", "2", "--keskar-iters", "2"],
    "surface": ["--xrange", "-1", "1", "3"],
    "interpolate": ["--steps", "0", "--to-step", "20", "--alphas", "0", "1", "3"],
    "trajectory": [],
    "collapse": [],
    "uniformity": [],
    "block_heterogeneity": ["--num-probes", "1", "--num-steps", "4", "--grid-len", "50"],
    "critical_sharpness": ["--max-evals", "10", "--max-iter", "8"],
    "curve": ["--steps", "0", "--to-step", "20", "--num-points", "3", "--curve-steps", "2"],
    "ggn_decomposition": ["--top-k", "2", "--block-size", "1"],
    "massive_activations": ["--top-k", "2"],
    "opposing_signals": ["--top-k", "4"],
    "similarity": ["--steps", "0", "--to-step", "20"],
    "topology": ["--xrange", "-1", "1", "3"],
    "weight_spectra": [],
}
# values that are NaN or inf by definition (not a failure): the global basin of topology never merges, so its
# death is inf and its saddle (value and position) NaN
MAY_BE_NAN: dict[str, set[str]] = {
    "topology": {"persistence_death", "basin_saddle", "basin_saddle_x", "basin_saddle_y"},
}
# probes that do not apply to a causal LM: exit 2 with one line holding this fragment. ggn_decomposition is
# Papyan's class-mean / cross-class / within-class split of the softmax GGN over per-example class labels
REFUSED = {"ggn_decomposition": "needs --loss cross_entropy"}


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    """(folder, run path): three GPT-2 checkpoints with AdamW state; the folder holds the data factory's module."""
    folder = tmp_path_factory.mktemp("hf_probes")
    (folder / f"{MODULE}.py").write_text(DATA)
    run = folder / "run.h5"
    optimizer = {"name": "AdamW", "defaults": {"betas": [0.9, 0.999], "eps": 1e-8, "lr": 0.1}}
    with RunWriter(run, model_spec=SPEC, data_spec={"factory": f"{MODULE}:build"}, loss="causal_lm",
                   optimizer=optimizer) as w:
        for step in STEPS:
            torch.manual_seed(step)
            model = build_model(SPEC)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn_like(p))
            state = {n: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": 1e-4 * torch.rand_like(p),
                         "step": torch.tensor(float(step + 1))} for n, p in model.named_parameters()}
            w.write_checkpoint(step, model.state_dict(), optimizer_state=state, attrs={"lr": 0.1})
    return folder, run


@pytest.fixture
def in_run_folder(gpt2_run, monkeypatch):
    """The run's folder as the working directory (its data factory is found there) and a fresh module cache."""
    folder, run = gpt2_run
    monkeypatch.chdir(folder)
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    return folder, run


def run_cli(capsys, name: str, run, results, *extra: str) -> tuple[int, dict | None, str]:
    """(exit code, the --json report or None, stderr) of ``lossatlas NAME RUN ...``."""
    capsys.readouterr()
    code = main([name, str(run), "--results", str(results), "--json", "--quiet", *CASES[name], *extra])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_every_registered_probe_has_a_case():
    assert set(CASES) == set(PROBES)


@pytest.mark.parametrize("name", sorted(set(REFUSED)))
def test_probes_that_do_not_apply_to_a_causal_lm_refuse_in_one_line(name, in_run_folder, capsys):
    folder, run = in_run_folder
    code, _, err = run_cli(capsys, name, run, folder / f"{name}.results.h5")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert REFUSED[name] in lines[0] and "causal_lm" in lines[0]


@pytest.mark.parametrize("name", sorted(set(CASES) - set(REFUSED)))
def test_every_probe_runs_on_a_tiny_gpt2_through_the_cli(name, in_run_folder, capsys):
    folder, run = in_run_folder
    results = folder / f"{name}.results.h5"
    code, report, err = run_cli(capsys, name, run, results)
    assert code == 0, err
    (outcome,) = report["steps"]
    assert outcome["meta"]["loss"] == "causal_lm" and outcome["meta"]["output"] == "logits"
    with ResultsStore(results, mode="r") as store:
        stored, info = store.read(name, report["key"], outcome["step"])
    assert info["status"] == "complete" and stored.values
    for key, arr in stored.values.items():
        if arr.dtype.kind == "f" and key not in MAY_BE_NAN.get(name, set()):
            assert np.isfinite(arr).all(), f"{name}: {key} = {arr}"


@pytest.mark.parametrize("name", ["loss", "surface", "hessian", "collapse"])
def test_loss_model_gives_the_causal_lm_numbers_and_a_key_of_its_own(name, in_run_folder, capsys):
    """HF's own causal-LM loss (float32 inside transformers) equals ours to float32 rounding, stored apart."""
    folder, run = in_run_folder
    results = folder / f"{name}.model.results.h5"
    code, ours, err = run_cli(capsys, name, run, results)
    assert code == 0, err
    code, theirs, err = run_cli(capsys, name, run, results, "--loss", "model")
    assert code == 0, err
    assert theirs["key"] != ours["key"] and theirs["steps"][0]["status"] == "computed"  # not the cached result
    assert theirs["steps"][0]["meta"]["loss"] == "model" and theirs["steps"][0]["meta"]["output"] == "loss"
    with ResultsStore(results, mode="r") as store:
        a = store.read(name, ours["key"], STEPS[-1])[0]
        b = store.read(name, theirs["key"], STEPS[-1])[0]
    compared = 0
    for key, arr in a.values.items():
        if key in ("accuracy", "error") or arr.dtype.kind != "f" or "residual" in key or "direction" in key:
            continue
        np.testing.assert_allclose(b.values[key], arr, rtol=2e-5, atol=1e-6, err_msg=f"{name}: {key}")
        compared += 1
    assert compared
    if "accuracy" in b.values:  # the outputs are the loss: no prediction, so no accuracy (never a wrong 0)
        assert np.isnan(b.values["accuracy"]).all()


@pytest.mark.parametrize("args, needle", [
    (["hessian", "--curvature", "ggn"], "--curvature ggn"),
    (["hessian", "--curvature", "empirical_fisher"], "--curvature empirical_fisher"),
    (["sharpness", "--measures", "fisher_rao"], "fisher_rao"),
])
def test_loss_model_refuses_output_space_quantities_in_one_line(args, needle, in_run_folder, capsys):
    folder, run = in_run_folder
    capsys.readouterr()
    code = main([args[0], str(run), "--results", str(folder / "refused.h5"), "--loss", "model", *args[1:]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert needle in err[0] and "--loss causal_lm" in err[0]


def test_output_flag_is_used_recorded_and_refused_when_absent(in_run_folder, capsys):
    folder, run = in_run_folder
    results = folder / "output.results.h5"
    code, default, _ = run_cli(capsys, "loss", run, results)
    code2, named, err = run_cli(capsys, "loss", run, results, "--output", "logits")
    assert code == code2 == 0, err
    assert named["key"] == default["key"] and named["steps"][0]["status"] == "cached"  # "logits" is the default
    code, _, err = run_cli(capsys, "loss", run, results, "--output", "hidden")
    assert code == 2 and "no tensor 'hidden'" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------- HF loss == ours
def hf_causal_lm_loss_in_its_dtype(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                                   shift_labels=None, **kwargs):
    """transformers' ForCausalLMLoss without its ``logits.float()``, which would make float64 logits float32.

    The shift, the flattening and transformers' own ``fixed_cross_entropy`` (ignore_index, mean) are as there.
    """
    from transformers.loss.loss_utils import fixed_cross_entropy

    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()
    return fixed_cross_entropy(logits.reshape(-1, vocab_size), shift_labels.reshape(-1).to(logits.device),
                               num_items_in_batch, ignore_index, **kwargs)


def float64_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(**{k: v for k, v in CONFIG.items() if k != "model_type"})
    return transformers.GPT2LMHeadModel(config).double().eval()


def token_batches():
    namespace: dict = {}
    exec(DATA, namespace)  # the same batches the run's data factory gives
    return namespace["build"]()


def test_model_loss_equals_causal_lm_in_float64_products_loss_and_surface():
    """HF's causal-LM loss (its float32 upcast removed) and ours: equal to 1e-10 relative, products included."""
    model = float64_gpt2()
    model.loss_function = hf_causal_lm_loss_in_its_dtype
    data = token_batches()
    ours = as_batches(data)
    theirs = model_loss_batches(model, as_batches(data, keep_labels=True))
    assert all("labels" in x for x, _ in theirs) and not any("labels" in x for x, _ in ours)
    # every batch weighs its counted next tokens, as HF's loss averages them
    assert [batch_count("model", y) for _, y in theirs] == [batch_count("causal_lm", y) for _, y in ours]
    assert [batch_count("model", y) for _, y in theirs] != [x["input_ids"].shape[0] for x, _ in ours]
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    H = HessianOperator(model, ours, "causal_lm", path="double_backward")
    la, ga = H.loss_and_gradient()
    HV = H @ V
    use_output(model, "loss")
    try:
        M = HessianOperator(model, theirs, "model", path="double_backward")
        lb, gb = M.loss_and_gradient()
        MV = M @ V
    finally:
        use_output(model, None)
    assert lb == pytest.approx(la, rel=1e-10)
    assert torch.allclose(gb, ga, rtol=1e-10, atol=1e-14)
    assert torch.allclose(MV, HV, rtol=1e-10, atol=1e-12)
    assert (MV - HV).norm() <= 1e-10 * HV.norm()
    # the notebook functions: loss, surface and top eigenvalues with loss="model" (a copy of the model is not needed)
    a, b = lossatlas.loss(model, data, "causal_lm"), lossatlas.loss(model, data, "model")
    assert b.scalar("loss") == pytest.approx(a.scalar("loss"), rel=1e-10)
    assert math.isnan(b.scalar("accuracy")) and b.meta["loss"] == "model" and b.meta["output"] == "loss"
    sa = lossatlas.surface(model, data, "causal_lm", xrange=(-0.5, 0.5, 3))
    sb = lossatlas.surface(model, data, "model", xrange=(-0.5, 0.5, 3))
    np.testing.assert_allclose(sb.values["loss"], sa.values["loss"], rtol=1e-10)
    assert "_lossatlas_output" not in vars(model)  # the caller's module is left as it was


def test_model_loss_of_real_transformers_code_is_float32_and_says_so():
    """transformers upcasts to float32: the same loss to float32 rounding, with a warning in the result."""
    model = float64_gpt2()
    data = token_batches()
    with pytest.warns(UserWarning, match="float32"):
        b = lossatlas.loss(model, data, "model")
    a = lossatlas.loss(model, data, "causal_lm")
    assert b.scalar("loss") == pytest.approx(a.scalar("loss"), rel=1e-6)
    assert b.scalar("loss") != a.scalar("loss")  # float32 rounding, not float64
    assert "float32" in b.meta["loss_precision_warning"]


def test_a_single_dict_batch_is_data():
    model = float64_gpt2()
    batch = token_batches()[1]
    whole = lossatlas.loss(model, batch, "causal_lm")
    split = lossatlas.loss(model, batch, "causal_lm", batch_size=2)
    assert split.scalar("loss") == pytest.approx(whole.scalar("loss"), rel=1e-12)
    labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert whole.scalar("loss") == pytest.approx(float(ref), rel=1e-12)
