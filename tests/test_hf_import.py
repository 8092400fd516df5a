"""`lossatlas import` of Hugging Face folders: save_pretrained output and Trainer checkpoint-N folders."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="Hugging Face import needs transformers installed")

from lossatlas.analysis.runner import load_model  # noqa: E402
from lossatlas.cli import main  # noqa: E402
from lossatlas.importer import import_checkpoints  # noqa: E402
from lossatlas.recorder import optimizer_state_by_name  # noqa: E402
from lossatlas.store import RunReader  # noqa: E402

CONFIG = {"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 50, "n_positions": 16}


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG)).eval()


def tokens(seed=1):
    return torch.randint(0, CONFIG["vocab_size"], (3, 8), generator=torch.Generator().manual_seed(seed))


def assert_same_state(stored, model):
    expected = model.state_dict()
    assert set(stored) == set(expected)
    for k, v in expected.items():
        assert stored[k].dtype == v.dtype and torch.equal(stored[k], v), k


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_save_pretrained_folder_round_trips(tmp_path, layout):
    model = tiny_gpt2()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder, max_shard_size="10KB" if layout == "sharded" else "5GB")
    if layout == "sharded":
        assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    if layout == "bin":  # the older format: a pickled state_dict, read weights-only
        (folder / "model.safetensors").unlink()
        torch.save({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, folder / "pytorch_model.bin")
    out = tmp_path / "run.h5"
    assert import_checkpoints([folder], out, loss="causal_lm") == [0]
    with RunReader(out) as r:
        spec = r.model_spec["hf"]
        assert spec["auto_class"] == "AutoModelForCausalLM"
        assert spec["config"]["n_embd"] == 16 and "transformers_version" not in spec["config"]
        assert_same_state(r.checkpoint(0).state_dict(), model)  # lm_head.weight, absent from the file, filled
        rebuilt = load_model(r, 0).eval()
    x = tokens()
    with torch.no_grad():
        assert torch.equal(rebuilt(x).logits, model(x).logits)


def test_lone_folder_step_flag_and_refusals(tmp_path, capsys):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "final")
    out = tmp_path / "run.h5"
    assert main(["import", str(tmp_path / "final"), "-o", str(out), "--step", "7"]) == 0
    with RunReader(out) as r:
        assert r.steps() == [7]
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}  # remote code: never imported
    (tmp_path / "final" / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["import", str(tmp_path / "final"), "-o", str(tmp_path / "evil.h5")]) == 2
    assert "remote code" in capsys.readouterr().err
    assert not (tmp_path / "evil.h5").exists()
    torch.save(model.state_dict(), tmp_path / "ckpt_3.pt")
    assert main(["import", str(tmp_path / "ckpt_3.pt"), "-o", str(tmp_path / "f.h5")]) == 2
    assert "--model is needed" in capsys.readouterr().err


def write_trainer_folders(root, trainer_groups):
    """Two checkpoint-N folders as transformers.Trainer writes them, from real AdamW steps."""
    model = tiny_gpt2().train()
    if trainer_groups:  # Trainer's groups: weight decay except biases and LayerNorm weights
        no_decay = [p for n, p in model.named_parameters() if "bias" in n or ".ln_" in n]
        decay = [p for n, p in model.named_parameters() if not ("bias" in n or ".ln_" in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-3)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history, saved = [], {}
    for step in range(1, 5):
        x = tokens(step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
        opt.step()
        opt.zero_grad()
        history.append({"loss": loss.item(), "grad_norm": grad_norm, "learning_rate": 1e-3 * step,
                        "epoch": step / 4, "step": step})
        if step % 2 == 0:
            history.append({"eval_loss": loss.item() + 0.5, "eval_runtime": 0.1, "epoch": step / 4, "step": step})
            folder = root / f"checkpoint-{step}"
            model.save_pretrained(folder)
            torch.save(opt.state_dict(), folder / "optimizer.pt")
            state = {"global_step": step, "log_history": history + [{"train_runtime": 1.0, "step": step}]}
            (folder / "trainer_state.json").write_text(json.dumps(state))
            saved[step] = ({k: v.clone() for k, v in model.state_dict().items()},
                           {n: {k: v.clone() for k, v in st.items()} for n, st in optimizer_state_by_name(model, opt).items()})
    return model, history, saved


@pytest.mark.parametrize("trainer_groups", [False, True])
def test_trainer_folders_bring_steps_log_and_adam_state(tmp_path, capsys, trainer_groups):
    model, history, saved = write_trainer_folders(tmp_path / "out", trainer_groups)
    out = tmp_path / "run.h5"
    assert main(["import", str(tmp_path / "out"), "-o", str(out), "--loss", "causal_lm"]) == 0
    with RunReader(out) as r:
        assert r.steps() == [2, 4]
        assert r.optimizer["name"] == "AdamW" and r.optimizer["defaults"]["betas"] == [0.9, 0.999]
        for step, (state, opt_state) in saved.items():
            ck = r.checkpoint(step, optimizer_state=True)
            back = ck.state_dict()
            assert all(torch.equal(back[k], v) for k, v in state.items())
            assert set(ck.optimizer_state) == set(opt_state)
            for name, st in opt_state.items():
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    assert torch.equal(ck.optimizer_state[name][key], st[key]), (step, name, key)
        assert r.checkpoint_attrs(4)["lr"] == pytest.approx(4e-3)
        log = r.log()
    train = [h for h in history if "loss" in h]
    assert list(log["step"]) == [1, 2, 3, 4]
    assert list(log["loss"]) == [h["loss"] for h in train]
    assert list(log["lr"]) == [h["learning_rate"] for h in train]
    assert list(log["grad_norm"]) == [h["grad_norm"] for h in train]
    assert log["eval_loss"][1] == history[2]["eval_loss"] and log["eval_loss"][0] != log["eval_loss"][0]  # NaN
    assert "train_runtime" not in log
    capsys.readouterr()
    assert main(["diagnose", str(out), "--no-curvature"]) == 0
    folders = [str(tmp_path / "out" / f"checkpoint-{s}") for s in (4, 2)]  # the folders one by one, any order
    assert main(["import", *folders, "-o", str(tmp_path / "again.h5")]) == 0
    with RunReader(tmp_path / "again.h5") as r:
        assert r.steps() == [2, 4] and list(r.log()["step"]) == [1, 2, 3, 4]


def test_pickled_optimizer_is_skipped_with_a_warning_and_never_run(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    tiny_gpt2().save_pretrained(tmp_path / "out" / "checkpoint-10")
    torch.save({"state": {0: {"exp_avg": Evil()}}, "param_groups": []}, tmp_path / "out" / "checkpoint-10" / "optimizer.pt")
    out = tmp_path / "run.h5"
    assert main(["import", str(tmp_path / "out"), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert not marker.exists()
    assert sum("optimizer state skipped" in line for line in err.splitlines()) == 1
    with RunReader(out) as r:
        assert r.steps() == [10] and r.optimizer is None
        assert r.checkpoint(10, optimizer_state=True).optimizer_state is None


def old_hub_state(model, prefix):
    """GPT-2's state_dict as older transformers saved it: causal-mask buffers in it, maybe no 'transformer.'."""
    n = CONFIG["n_positions"]
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: not saved
    for i in range(CONFIG["n_layer"]):
        state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state if prefix else {k.removeprefix("transformer."): v for k, v in state.items()}


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("form", ["folder", "file"])
def test_old_hub_gpt2_layouts_import_and_load(tmp_path, capsys, prefix, form):
    model = tiny_gpt2()
    state = old_hub_state(model, prefix)
    assert ("transformer.h.0.attn.c_attn.weight" in state) == prefix and ("h.0.attn.c_attn.weight" in state) != prefix
    out = tmp_path / "run.h5"
    if form == "folder":  # config.json with pytorch_model.bin, as old hub repositories hold them
        folder = tmp_path / "gpt2-old"
        model.config.architectures = ["GPT2LMHeadModel"]  # as save_pretrained writes it
        model.config.save_pretrained(folder)
        torch.save(state, folder / "pytorch_model.bin")
        argv = ["import", str(folder), "-o", str(out)]
    else:  # a lone file with the model spec given
        torch.save(state, tmp_path / "gpt2_40.bin")
        spec = {"hf": {"auto_class": "AutoModelForCausalLM", "config": {"model_type": "gpt2", **CONFIG}}}
        argv = ["import", str(tmp_path / "gpt2_40.bin"), "-o", str(out), "--model", json.dumps(spec)]
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "ignored causal-mask buffers" in err and "transformer.h.0.attn.masked_bias" in err
    assert ("added the 'transformer.' prefix" in err) != prefix
    with RunReader(out) as r:
        assert r.steps() == ([0] if form == "folder" else [40])
        assert_same_state(r.checkpoint(r.steps()[0]).state_dict(), model)  # no mask buffer stored
        rebuilt = load_model(r, r.steps()[0]).eval()
    x = tokens()
    with torch.no_grad():
        assert torch.equal(rebuilt(x).logits, model(x).logits)


def test_a_prefixed_checkpoint_loads_into_the_base_model(tmp_path, capsys):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "lm")  # keys transformer.*, lm_head tied so not saved
    spec = {"hf": {"auto_class": "AutoModel", "config": {"model_type": "gpt2", **CONFIG}}}
    out = tmp_path / "base.h5"
    assert main(["import", str(tmp_path / "lm"), "-o", str(out), "--model", json.dumps(spec)]) == 0
    assert "removed the 'transformer.' prefix" in capsys.readouterr().err
    with RunReader(out) as r:
        back = r.checkpoint(0).state_dict()
        base = load_model(r, 0).eval()
    assert isinstance(base, transformers.GPT2Model)
    for k, v in model.transformer.state_dict().items():
        assert torch.equal(back[k], v), k
    x = tokens()
    with torch.no_grad():
        assert torch.equal(base(x).last_hidden_state, model.transformer(x).last_hidden_state)


def test_keys_that_are_not_mask_buffers_are_still_refused(tmp_path, capsys):
    model = tiny_gpt2()
    state = old_hub_state(model, prefix=True)
    state["transformer.h.0.attn.bias"] = torch.zeros(16)  # not a mask: a real tensor the model lacks
    folder = tmp_path / "odd"
    model.config.architectures = ["GPT2LMHeadModel"]
    model.config.save_pretrained(folder)
    torch.save(state, folder / "pytorch_model.bin")
    assert main(["import", str(folder), "-o", str(tmp_path / "run.h5")]) == 2
    assert "unexpected transformer.h.0.attn.bias" in capsys.readouterr().err
    assert not (tmp_path / "run.h5").exists()
