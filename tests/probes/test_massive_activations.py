"""Massive activations and attention sinks: planted massive entries and sink heads recovered exactly, every value
equal to a brute-force recomputation from the model's own hidden states and attention weights, and the CLI.

References: (i) a GPT whose block 1 MLP output bias holds 1000 in feature 5: every token is massive in feature 5
from layer 1 on (the residual stream carries it), none at layer 0 unless planted there; (ii) a hook adding 500 to
feature 7 of the first token at layer 0 (massive at token 0 only); (iii) a head whose logits get +60 on key 0: its
attention on the first token is 1 to within e^-50, the unmodified heads sit far below 0.5; (iv) brute force from
``output_hidden_states``/``output_attentions`` of Hugging Face GPT-2 and Llama (eager attention), padding included.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from lossatlas.models.gpt import build_gpt
from lossatlas.probes.base import ProbeContext
from lossatlas.probes.massive_activations import MassiveActivations, massive_mask, sink_mass

GPT_KW = {"vocab_size": 32, "block_size": 16, "n_layer": 3, "n_head": 4, "n_embd": 32}


class PlantSink(nn.Module):
    """Adds ``boost`` to the logits of head ``head`` on key 0 (a planted attention sink)."""

    def __init__(self, head: int, boost: float) -> None:
        super().__init__()
        self.head, self.boost = head, boost

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        out = logits.clone()
        out[:, self.head, :, 0] += self.boost
        return out


def plant(model: nn.Module, dim: int = 5, sink: tuple[int, int] = (1, 2)) -> nn.Module:
    with torch.no_grad():
        model.blocks[1].mlp.proj.bias[dim] = 1000.0  # planted massive feature from layer 1 on
    model.blocks[sink[0]].attn.logits_hook = PlantSink(sink[1], 60.0)
    return model


def planted_gpt() -> nn.Module:
    torch.manual_seed(0)
    return plant(build_gpt(**GPT_KW)).eval()


def first_token_spike(_m, _inp, out):
    out = out.clone()
    out[:, 0, 7] += 500.0  # massive at token 0, feature 7 of layer 0 only
    return out


def brute_force(hidden: list[np.ndarray], attn: list[np.ndarray], valid: np.ndarray, *, ratio: float,
                min_value: float, threshold: float, k: int) -> dict:
    """Every value of the probe from (N, T, d) hidden states and (N, H, T, T) attentions, loop by loop."""
    N, T = valid.shape
    out: dict = {"median": [], "count": [], "dims": [], "first_share": [], "top": [], "mass": []}
    first = [int(np.flatnonzero(valid[n])[0]) for n in range(N)]
    for h in hidden:
        entries = [(abs(h[n, t, j]), n, t, j) for n in range(N) for t in range(T) if valid[n, t]
                   for j in range(h.shape[2])]
        med = float(np.median([e[0] for e in entries]))
        massive = [e for e in entries if e[0] > min_value and e[0] >= ratio * med]
        out["median"].append(med)
        out["count"].append(len(massive))
        out["dims"].append(sorted({e[3] for e in massive}))
        out["first_share"].append(sum(e[2] == first[e[1]] for e in massive) / len(massive) if massive else 0.0)
        out["top"].append(sorted(entries, key=lambda e: -e[0])[:k])  # sorted() is stable: ties in (n, t, j) order
    for a in attn:
        mass = []
        for hd in range(a.shape[1]):
            vals = [a[n, hd, t, first[n]] for n in range(N) for t in range(T) if valid[n, t] and t > first[n]]
            mass.append(sum(vals) / len(vals))
        out["mass"].append(mass)
    return out


def assert_matches(v: dict, ref: dict, *, k: int, threshold: float) -> None:
    np.testing.assert_allclose(v["layer_median_abs"], ref["median"], rtol=1e-12)
    np.testing.assert_array_equal(v["layer_num_massive"], ref["count"])
    for li, dims in enumerate(ref["dims"]):
        assert list(np.flatnonzero(v["massive_dims"][li])) == dims, li
    np.testing.assert_allclose(v["layer_first_token_share"], ref["first_share"], rtol=1e-12)
    for li, rows in enumerate(ref["top"]):
        np.testing.assert_allclose(v["top_abs"][li, : len(rows)], [r[0] for r in rows], rtol=1e-12)
        assert [tuple(int(x) for x in r[1:]) for r in rows] == list(zip(
            v["top_sequence"][li, : len(rows)], v["top_token"][li, : len(rows)], v["top_dim"][li, : len(rows)]))
        np.testing.assert_allclose(v["top_ratio"][li, 0], rows[0][0] / ref["median"][li], rtol=1e-12)
    np.testing.assert_allclose(v["layer_max_abs"], [rows[0][0] for rows in ref["top"]], rtol=1e-12)
    np.testing.assert_allclose(v["sink_mass"], ref["mass"], rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal(v["sink_heads"], np.asarray(ref["mass"]) > threshold)


# -- closed forms ------------------------------------------------------------------------------------------------
def test_massive_mask_follows_the_paper_criterion():
    h = torch.full((2, 4, 8), 0.1)  # median |h| = 0.1
    h[0, 0, 3] = -150.0  # massive: 150 > 100 and 150 ≥ 1000 · 0.1
    h[1, 2, 5] = 99.0  # below the floor of 100: not massive
    h[1, 3, 1] = 100.0  # exactly 100: not massive (greater than 100 is required)
    mask, median = massive_mask(h)
    assert median == pytest.approx(0.1)
    assert int(mask.sum()) == 1 and bool(mask[0, 0, 3])
    mask, _ = massive_mask(h, ratio=500.0, min_value=50.0)
    assert int(mask.sum()) == 3
    mask, _ = massive_mask(h, ratio=1001.0)  # 100 < 1001·0.1: nothing but 150 (and 150 ≥ 100.1)
    assert int(mask.sum()) == 1
    valid = torch.ones(2, 4, dtype=torch.bool)
    valid[0, 0] = False  # the massive entry's position is padding
    mask, _ = massive_mask(h, valid=valid)
    assert int(mask.sum()) == 0


def test_sink_mass_brute_force_with_padding():
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    a = torch.softmax(torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(0)).masked_fill(~causal, -torch.inf), -1)
    a64 = a.double()
    expected = torch.stack([torch.stack([a64[b, h, 1:, 0] for b in range(3)]).mean() for h in range(2)])
    torch.testing.assert_close(sink_mass(a), expected, rtol=1e-12, atol=0)
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[0, 3:] = False  # right padding
    valid[1, :2] = False  # left padding: its first token is position 2
    ref = brute_force([np.zeros((3, 5, 1))], [a.double().numpy()], valid.numpy(), ratio=1.0, min_value=0.0,
                      threshold=0.5, k=1)["mass"][0]
    np.testing.assert_allclose(sink_mass(a, valid).numpy(), ref, rtol=1e-12)
    with pytest.raises(ValueError, match="two tokens"):
        sink_mass(a[:, :, :1, :1])


# -- planted models --------------------------------------------------------------------------------------------
def test_planted_gpt_exact_recovery():
    model = planted_gpt()
    model.blocks[0].register_forward_hook(first_token_spike)
    x = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(1))
    v = MassiveActivations(top_k=4).run(ProbeContext(model=model, data=[(x[:3], x[:3]), (x[3:], x[3:])])).values
    expected = np.zeros((3, 32), dtype=bool)
    expected[1:, 5] = True
    expected[:, 7] = True  # the first-token spike rides the residual stream into layers 1 and 2
    np.testing.assert_array_equal(v["massive_dims"], expected)
    np.testing.assert_array_equal(v["layer_num_massive_dims"], [1, 2, 2])  # feature 7 rides the residual stream
    np.testing.assert_array_equal(v["layer_num_massive"][0], 4)  # one first token per sequence
    assert v["layer_first_token_share"][0] == 1.0
    np.testing.assert_array_equal(v["top_token"][0], [0, 0, 0, 0])
    np.testing.assert_array_equal(v["top_dim"][0], [7, 7, 7, 7])
    assert sorted(v["top_sequence"][0]) == [0, 1, 2, 3]  # the second batch's sequence is number 3
    assert v["layer_num_massive"][1] == 4 * 16 + 4  # feature 5 at every token, feature 7 at every first token
    assert v["top_value"][1, 0] == pytest.approx(v["top_abs"][1, 0])  # the planted bias is positive
    sinks = np.zeros((3, 4), dtype=bool)
    sinks[1, 2] = True
    np.testing.assert_array_equal(v["sink_heads"], sinks)
    assert v["sink_mass"][1, 2] == pytest.approx(1.0, abs=1e-12)
    assert np.delete(v["sink_mass"].ravel(), 1 * 4 + 2).max() < 0.4
    np.testing.assert_allclose(v["layer_sink_share"], [0.0, 0.25, 0.0])
    assert int(v["num_sink_heads"]) == 1 and int(v["num_massive_layers"]) == 3 and int(v["num_massive_dims"]) == 2
    assert float(v["sink_head_share"]) == pytest.approx(1 / 12)


def test_gpt_equals_brute_force_and_restores_the_model():
    model = planted_gpt()
    model.train()
    model.blocks[0].eval()  # a mixed train/eval state must come back exactly
    flags = [m.training for m in model.modules()]
    x = torch.randint(0, 32, (3, 9), generator=torch.Generator().manual_seed(4))
    probe = MassiveActivations(ratio=3.0, min_value=0.01, top_k=5)
    v = probe.run(ProbeContext(model=model, data=[(x, x)])).values
    assert [m.training for m in model.modules()] == flags
    # brute force: the block outputs and softmax(causal logits) recomputed by hand, block by block
    with torch.no_grad():
        model.eval()
        h = (model.tok_emb(x) + model.pos_emb(torch.arange(9))) * model.emb_scale
        hidden, attn = [], []
        for block in model.blocks:
            a_in = block.ln_1(h)
            at = block.attn
            q, k_ = at._heads(at.q_proj(a_in)), at._heads(at.k_proj(a_in))
            z = at.logits_hook((q @ k_.transpose(-2, -1)) / np.sqrt(at.head_dim))
            attn.append(torch.softmax(z.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), -torch.inf), -1))
            h = block(h)
            hidden.append(h)
    ref = brute_force([t.double().numpy() for t in hidden], [t.double().numpy() for t in attn],
                      np.ones((3, 9), dtype=bool), ratio=3.0, min_value=0.01, threshold=0.5, k=5)
    assert_matches(v, ref, k=5, threshold=0.5)
    assert sum(ref["count"]) > 0  # the comparison covers massive entries
    # the floor is strict (|h| > min_value): at min_value = the layer's largest |h| nothing is massive
    top = float(v["layer_max_abs"][0])
    at = MassiveActivations(ratio=0.0, min_value=top).run(ProbeContext(model=model, data=[(x, x)])).values
    below = MassiveActivations(ratio=0.0, min_value=float(np.nextafter(top, 0.0))).run(
        ProbeContext(model=model, data=[(x, x)])).values
    assert at["layer_num_massive"][0] == 0 and below["layer_num_massive"][0] == 1


# -- Hugging Face ------------------------------------------------------------------------------------------------
def hf_batch(vocab: int, seed: int) -> dict:
    ids = torch.randint(0, vocab, (3, 10), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


def test_hf_gpt2_matches_brute_force_from_output_hidden_states():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=40, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    before_impl = model.config._attn_implementation
    state = {k: t.clone() for k, t in model.state_dict().items()}
    batches = [hf_batch(40, 2), hf_batch(40, 3)]
    probe = MassiveActivations(ratio=4.0, min_value=0.0, top_k=3)
    res = probe.run(ProbeContext(model=model, data=[(b, b["input_ids"]) for b in batches]))
    assert model.config._attn_implementation == before_impl  # switched to eager and back
    assert all(torch.equal(state[k], t) for k, t in model.state_dict().items())
    assert res.meta["hidden_states"] == "layer outputs"
    # brute force: HF's hidden states (the last layer's output is the input of the final LayerNorm ln_f)
    eager = transformers.GPT2LMHeadModel(cfg)
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    eager.eval()
    hidden, attn = [[], []], [[], []]
    seen: list = []  # the input of ln_f of each forward
    handle = eager.transformer.ln_f.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    for b in batches:
        with torch.no_grad():
            out = eager(**b, output_hidden_states=True, output_attentions=True)
        for li, h in enumerate([*out.hidden_states[1:-1], seen[-1]]):
            hidden[li].append(h.double().numpy())
        for li, a in enumerate(out.attentions):
            attn[li].append(a.double().numpy())
    handle.remove()
    valid = np.concatenate([b["attention_mask"].numpy() != 0 for b in batches])
    ref = brute_force([np.concatenate(h) for h in hidden], [np.concatenate(a) for a in attn], valid,
                      ratio=4.0, min_value=0.0, threshold=0.5, k=3)
    assert sum(ref["count"]) > 0
    assert_matches(res.values, ref, k=3, threshold=0.5)
    assert not np.allclose(hidden[1][0], out.hidden_states[-1].double().numpy())  # ln_f changes the last one


def test_hf_llama_matches_brute_force():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=40, max_position_embeddings=32)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    batch = hf_batch(40, 5)
    res = MassiveActivations(ratio=3.0, min_value=0.0).run(ProbeContext(model=model, data=[(batch, None)]))
    assert res.meta["hidden_states"] == "layer outputs"
    model.set_attn_implementation("eager")
    seen = []
    handle = model.model.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
    handle.remove()
    hidden = [h.double().numpy() for h in [*out.hidden_states[1:-1], seen[0]]]
    ref = brute_force(hidden, [a.double().numpy() for a in out.attentions], batch["attention_mask"].numpy() != 0,
                      ratio=3.0, min_value=0.0, threshold=0.5, k=3)
    assert res.values["sink_mass"].shape == (2, 4)
    assert_matches(res.values, ref, k=3, threshold=0.5)


# -- refusals and settings ---------------------------------------------------------------------------------------
def test_bad_settings_and_models():
    for bad in ({"sink_threshold": 1.5}, {"max_batches": 0}, {"top_k": 0}, {"ratio": -1.0}, {"min_value": np.nan}):
        with pytest.raises(ValueError):
            MassiveActivations(**bad)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no attention layers or residual stream") as info:
        MassiveActivations().run(ProbeContext(model=mlp, data=[(torch.zeros(2, 3), torch.zeros(2))]))
    assert "\n" not in str(info.value)
    x = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="at least two tokens"):
        MassiveActivations().run(ProbeContext(model=planted_gpt(), data=[(x, x)]))


# -- command line ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    """A run of two checkpoints of a tiny GPT on token_stream; step 10's has the planted feature and sink."""
    from lossatlas.store import RunWriter

    spec = {"name": "gpt", "kwargs": GPT_KW}
    data = {"name": "token_stream", "kwargs": {"vocab_size": 32, "block_size": 16, "n_sequences": 8}}
    run = tmp_path_factory.mktemp("massive") / "run.h5"
    with RunWriter(run, model_spec=spec, data_spec=data, loss="cross_entropy") as w:
        torch.manual_seed(0)
        model = build_gpt(**GPT_KW)
        w.write_checkpoint(0, model.state_dict())
        with torch.no_grad():
            model.blocks[1].mlp.proj.bias[5] = 1000.0
        w.write_checkpoint(10, model.state_dict())
        for step in range(11):
            w.log(step, {"loss": 3.0 - 0.1 * step})  # a training log, which the report draws
    return run


def test_cli_end_to_end_on_a_gpt_run(gpt_run, tmp_path, capsys):
    from lossatlas.cli import main
    from lossatlas.store import ResultsStore

    results = tmp_path / "r.results.h5"
    code = main(["massive_activations", str(gpt_run), "--steps", "all", "--results", str(results), "--json", "--quiet",
                 "--top-k", "2", "--sink-threshold", "0.4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert [s["step"] for s in report["steps"]] == [0, 10]
    with ResultsStore(results, mode="r") as store:
        first, _ = store.read("massive_activations", report["key"], 0)
        last, info = store.read("massive_activations", report["key"], 10)
    assert info["status"] == "complete"
    assert last.config["top_k"] == 2 and last.config["sink_threshold"] == 0.4
    assert not first.values["massive_dims"].any() and int(first.values["num_massive_layers"]) == 0
    expected = np.zeros((3, 32), dtype=bool)
    expected[1:, 5] = True
    np.testing.assert_array_equal(last.values["massive_dims"], expected)
    np.testing.assert_array_equal(last.values["layer_num_massive"], [0, 8 * 16, 8 * 16])
    np.testing.assert_array_equal(last.values["top_dim"][1:], 5)
    assert last.values["top_abs"].shape == (3, 2)
    # the same numbers as the probe on the rebuilt model and the run's data
    from lossatlas import models
    from lossatlas.batches import as_batches

    model = build_gpt(**GPT_KW)
    from lossatlas.store import RunReader

    with RunReader(gpt_run) as reader:
        model.load_state_dict(reader.checkpoint(10).state_dict())
    x, y = models.build_data({"name": "token_stream", "kwargs": {"vocab_size": 32, "block_size": 16, "n_sequences": 8}})
    direct = MassiveActivations(top_k=2, sink_threshold=0.4).run(ProbeContext(model=model, data=as_batches((x, y), 256)))
    for key, value in direct.values.items():
        np.testing.assert_array_equal(np.asarray(last.values[key]), np.asarray(value), err_msg=key)
    # the figure of the stored results
    fig = tmp_path / "massive.png"
    assert main(["plot", str(gpt_run), "massive_activations", "--results", str(results), "-o", str(fig)]) == 0
    assert fig.stat().st_size > 1000
    html = tmp_path / "report.html"
    assert main(["report", str(gpt_run), "--results", str(results), "-o", str(html)]) == 0
    assert "Massive activations and attention sinks" in html.read_text()


def test_cli_refuses_an_mlp_in_one_line(tiny_run, tmp_path, capsys):
    from lossatlas.cli import main

    code = main(["massive_activations", str(tiny_run), "--results", str(tmp_path / "r.h5"), "--max-examples", "32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "no attention layers or residual stream" in err[0] and "transformer" in err[0]


def test_figures_draw_the_stored_numbers():
    from lossatlas.viz import interactive_figures, paper_figure

    model = planted_gpt()
    x = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for step in (0, 5):
        r = MassiveActivations().run(ProbeContext(model=model, data=[(x, x)], step=step))
        results.append(r)
    fig = paper_figure("massive_activations", results)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), results[-1].values["top_abs"][:, 0])
    assert ax.get_yscale() == "log"
    image = fig.axes[1].images[0]
    np.testing.assert_allclose(np.asarray(image.get_array()), results[-1].values["sink_mass"])
    assert len(fig.axes) >= 4  # magnitudes, heatmap (+ its colorbar), the timeline of two steps
    figs = interactive_figures("massive_activations", results)
    assert len(figs) == 3 and all(len(f.data) > 0 for f in figs)


# -- training telemetry ------------------------------------------------------------------------------------------
def test_attention_head_monitor_logs_the_probes_sink_mass():
    """``attn_sink/layer<i>/head<h>`` of the per-step telemetry equals the probe's sink mass (no padding)."""
    from lossatlas.telemetry import AttentionHeadMonitor

    model = planted_gpt()
    x = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(6))
    mass = MassiveActivations().run(ProbeContext(model=model, data=[(x[:2], x[:2]), (x[2:], x[2:])])).values["sink_mass"]
    with AttentionHeadMonitor(model) as mon:
        assert {n for n in mon.names() if n.startswith("attn_sink/")} == {
            f"attn_sink/layer{i}/head{h}" for i in range(3) for h in range(4)}
        with torch.no_grad():
            model(x[:2])
            model(x[2:])  # two forwards before one collect: the mean over both, as the probe's over its batches
        logged = mon.collect()
    got = np.array([[logged[f"attn_sink/layer{i}/head{h}"] for h in range(4)] for i in range(3)])
    np.testing.assert_allclose(got, mass, rtol=2e-6)  # float32 softmax in the monitor, float64 in the probe
    assert got[1, 2] > 0.999 and np.delete(got.ravel(), 6).max() < 0.4
