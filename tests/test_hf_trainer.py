"""A real ``transformers.Trainer`` run, imported with ``lossatlas import`` and analysed through the CLI.

The Trainer writes ``checkpoint-3/`` and ``checkpoint-6/`` (model.safetensors, optimizer.pt,
trainer_state.json) for a tiny random-init GPT-2; a callback snapshots the live model and AdamW state
at each save. The import must give back every tensor bit for bit, the steps, the log history and Adam's
moments under the right parameter names (mapped through the live optimizer's own parameter order, not
the importer's); ``diagnose``, ``plot training`` and ``hessian`` must work on the run, the Hessian's top
eigenvalues equal to a dense float64 Hessian of the eager-attention model.
"""

import json
import math

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

transformers = pytest.importorskip("transformers", reason="the Trainer test needs transformers installed")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install accelerate)")

from safetensors.torch import load_file  # noqa: E402

from lossatlas.cli import main  # noqa: E402
from lossatlas.models import build_data  # noqa: E402
from lossatlas.store import RunReader  # noqa: E402
from lossatlas.store.results import ResultsStore  # noqa: E402

import reference as ref  # noqa: E402

CONFIG = {"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 64, "n_positions": 32}
# the training data and the probes' data: 8 windows of 8 tokens; targets are the inputs shifted by one
DATA = {"name": "token_stream", "kwargs": {"vocab_size": 64, "block_size": 8, "n_sequences": 8}}
STEPS = (3, 6)


class TokenDicts(torch.utils.data.Dataset):
    """Dict examples as a tokenized HF dataset gives them: labels = input_ids (the model shifts them)."""

    def __init__(self, tokens):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


class Snapshots(transformers.TrainerCallback):
    """At each save: the model's state_dict and AdamW's state keyed by name in the optimizer's own order."""

    def __init__(self):
        self.saved = {}

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        adam = {names[id(p)]: {k: v.clone() for k, v in st.items()} for p, st in optimizer.state.items()}
        self.saved[state.global_step] = {"state": {k: v.clone() for k, v in model.state_dict().items()},
                                         "order": order, "adam": adam,
                                         "groups": [len(g["params"]) for g in optimizer.param_groups]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The Trainer's output folder, the import of it (run.h5), and the snapshots taken at each save."""
    root = tmp_path_factory.mktemp("trainer")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))
    tokens, _ = build_data(DATA)
    snapshots = Snapshots()
    args = transformers.TrainingArguments(
        output_dir=str(root / "out"), max_steps=6, save_steps=3, logging_steps=1, per_device_train_batch_size=4,
        report_to=[], use_cpu=True, optim="adamw_torch", learning_rate=1e-2, weight_decay=0.01,
        disable_tqdm=True, seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=TokenDicts(tokens), callbacks=[snapshots]).train()
    run = root / "run.h5"
    assert main(["import", str(root / "out"), "-o", str(run), "--loss", "cross_entropy",
                 "--data", json.dumps(DATA)]) == 0
    return root, run, snapshots.saved


def test_trainer_wrote_what_the_import_reads(trained):
    root, _, saved = trained
    assert sorted(saved) == list(STEPS)
    for s in STEPS:
        folder = root / "out" / f"checkpoint-{s}"
        assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "config.json"} <= {
            p.name for p in folder.iterdir()}
    assert saved[6]["groups"] == [6, 10]  # Trainer's split: 6 matrices decayed; biases and LayerNorms not


def test_every_tensor_round_trips_bit_for_bit(trained):
    root, run, saved = trained
    with RunReader(run) as r:
        assert r.steps() == list(STEPS)
        assert r.model_spec["hf"]["auto_class"] == "AutoModelForCausalLM"
        for s in STEPS:
            back = r.checkpoint(s).state_dict()
            on_disk = load_file(str(root / "out" / f"checkpoint-{s}" / "model.safetensors"))
            live = saved[s]["state"]
            assert set(back) == set(live)  # lm_head.weight, tied to wte and absent from the file, filled in
            assert set(on_disk) <= set(back)
            for k, v in live.items():
                assert back[k].dtype == v.dtype and torch.equal(back[k], v), (s, k)
            for k, v in on_disk.items():
                assert torch.equal(back[k], v), (s, k)
        assert not torch.equal(r.checkpoint(3).state_dict()["transformer.wte.weight"],
                               r.checkpoint(6).state_dict()["transformer.wte.weight"])  # training moved it


def test_log_history_arrives_in_the_runs_log(trained):
    root, run, _ = trained
    history = json.loads((root / "out" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    rows = {h["step"]: h for h in history if "loss" in h}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    with RunReader(run) as r:
        log = r.log()
        attrs = {s: r.checkpoint_attrs(s) for s in STEPS}
    assert list(log["step"]) == [1, 2, 3, 4, 5, 6]
    for name, key in (("loss", "loss"), ("lr", "learning_rate"), ("grad_norm", "grad_norm"), ("epoch", "epoch")):
        assert list(log[name]) == [rows[s][key] for s in range(1, 7)], name
    assert len(set(log["lr"])) == 6  # the linear schedule's decay, step by step
    for s in STEPS:
        assert attrs[s]["lr"] == rows[s]["learning_rate"]


def test_adam_state_is_mapped_to_parameter_names(trained):
    root, run, saved = trained
    with RunReader(run) as r:
        assert r.optimizer["name"] == "AdamW"
        assert r.optimizer["defaults"]["lr"] == pytest.approx(1e-2) and r.optimizer["defaults"]["weight_decay"] == 0.01
        for s in STEPS:
            stored = r.checkpoint(s, optimizer_state=True).optimizer_state
            raw = torch.load(root / "out" / f"checkpoint-{s}" / "optimizer.pt", weights_only=True)
            order, live = saved[s]["order"], saved[s]["adam"]
            assert set(stored) == set(order) == set(live)
            for i, name in enumerate(order):  # the file's integer ids, named by the live optimizer's own order
                for key in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(stored[name][key], raw["state"][i][key]), (s, name, key)
                    assert torch.equal(stored[name][key], live[name][key]), (s, name, key)
                assert float(stored[name]["step"]) == s


def test_diagnose_and_plot_training_work_on_the_imported_run(trained, capsys):
    root, run, _ = trained
    capsys.readouterr()
    assert main(["diagnose", str(run), "--no-curvature"]) == 0
    out = root / "training.png"
    assert main(["plot", str(run), "training", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class Logits(torch.nn.Module):
    """The model's logits as a tensor, for the dense reference (which calls model(x))."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(input_ids=x).logits


def dense_hessian(model, x, y):
    """H of the mean token cross-entropy over the flat parameters, float64, by reverse-over-reverse autodiff.

    Rows in blocks of 512 (vmapped backward over one-hot cotangents); a sample of rows, LayerNorm weights
    among them, is checked against one plain backward each (the reference's own method).
    """
    f, theta = ref.loss_function(Logits(model).double(), [(x, y)], "cross_entropy")
    theta = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(theta), theta, create_graph=True)
    P, rows = theta.numel(), []
    for start in range(0, P, 512):
        n = min(512, P - start)
        eye = torch.zeros(n, P, dtype=theta.dtype)
        eye[torch.arange(n), torch.arange(start, start + n)] = 1
        rows.append(torch.autograd.grad(g, theta, grad_outputs=eye, is_grads_batched=True, retain_graph=True)[0])
    H = torch.cat(rows).detach()
    ln_1 = CONFIG["vocab_size"] * 16 + CONFIG["n_positions"] * 16  # wte, wpe, then ln_1.weight
    rows = [*range(0, P, 401), ln_1, ln_1 + 5]
    plain = torch.stack([torch.autograd.grad(g[i], theta, retain_graph=True)[0].detach() for i in rows])
    ref.close(H[rows], plain, rtol=1e-12)
    return 0.5 * (H + H.T)


def test_hessian_top_eigenvalues_equal_a_dense_float64_hessian(trained, capsys):
    root, run, saved = trained
    capsys.readouterr()
    assert main(["hessian", str(run), "--top-k", "2", "--dtype", "float64", "--tol", "1e-9", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (outcome,) = report["steps"]
    assert outcome["step"] == 6 and outcome["meta"]["attention_backend"] == "math"
    with ResultsStore(report["results"], mode="r") as rs:
        result, _ = rs.read("hessian", report["key"], 6)
    top = np.asarray(result.values["top_eigenvalues"])
    # the reference: the checkpoint's weights in a GPT-2 built with eager attention (no SDPA at all)
    model = transformers.GPT2LMHeadModel._from_config(transformers.GPT2Config(**CONFIG), attn_implementation="eager")
    model.load_state_dict(saved[6]["state"])
    x, y = build_data(DATA)
    H = dense_hessian(model.eval(), x, y).numpy()
    expected = np.sort(sla.eigsh(H, k=2, which="LA", tol=1e-14)[0])[::-1]
    assert math.isfinite(expected[0]) and expected[0] > 0
    np.testing.assert_allclose(top, expected, rtol=1e-6)
