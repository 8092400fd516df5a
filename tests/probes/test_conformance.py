"""One conformance suite over every registered probe: constructible with defaults, rejects a bad value,
deterministic under a seed, survives a store round-trip, leaves the user's model untouched, and declares a
report section and a figure that exist."""

import dataclasses

import numpy as np
import pytest
import torch

import lossatlas.probes.registry  # noqa: F401  (registers every probe)
from lossatlas import models
from lossatlas.batches import as_batches
from lossatlas.probes import PROBES, ProbeContext
from lossatlas.store import ResultsStore

# Fast settings per probe, and one bad setting each; a new probe must add itself here.
FAST = {
    "loss": {},
    "hessian": {"top_k": 2, "trace": True, "trace_matvecs": 12, "density": True, "num_steps": 12, "num_probes": 2},
    "sharpness": {"measures": ("grad_norm", "sam", "average_case"), "num_samples": 4},
    "surface": {"xrange": (-1.0, 1.0, 3), "yrange": (-1.0, 1.0, 3)},
    "interpolate": {"to_step": 0, "alphas": (0.0, 1.0, 3)},
    "trajectory": {},
    "collapse": {},
    "uniformity": {},
    "hessian_blocks": {"block_k": 2},
    "hessian_ci": {"data_resamples": 2, "trace": True, "trace_matvecs": 12},
    "adam_sharpness": {},
    "batch_scan": {"batch_size_scan": (16, 32), "scan_batches": 2},
    "critical_sharpness": {"max_evals": 12},
    "block_heterogeneity": {"num_steps": 6, "grid_len": 64},
    "curve": {"to_step": 0, "num_points": 3, "curve_steps": 4},
    "topology": {"xrange": (-1.0, 1.0, 4), "yrange": (-1.0, 1.0, 3)},
    "weight_spectra": {},
    "similarity": {"to_step": 0, "max_examples": 60},
    "opposing_signals": {"top_k": 6},
    "ggn_decomposition": {"top_k": 3, "block_size": 3},
    "massive_activations": {"top_k": 2},
}
BAD = {
    "loss": {"mode": "sideways"},
    "hessian": {"top_k": -1},
    "sharpness": {"measures": ("nonsense",)},
    "surface": {"norm": "per-galaxy"},
    "interpolate": {"dir_type": "everything"},
    "trajectory": {"ignore": "nothing-at-all"},
    "collapse": {"nc1_variant": "magic"},
    "uniformity": {"t": -2.0},
    "hessian_blocks": {"block_k": 0},
    "hessian_ci": {"ci_level": 1.5},
    "adam_sharpness": {"tol": -1.0},
    "batch_scan": {"batch_size_scan": (0,)},
    "critical_sharpness": {"direction": "sideways"},
    "block_heterogeneity": {"partition": "atoms"},
    "curve": {"curve": "spline"},
    "topology": {"min_persistence": -1.0},
    "weight_spectra": {"min_evals": 1},
    "similarity": {"metrics": ("nonsense",)},
    "opposing_signals": {"top_k": 1},
    "ggn_decomposition": {"top_k": 0},
    "massive_activations": {"sink_threshold": 1.5},
}
SPEC = {"name": "mlp", "kwargs": {"widths": [64, 12, 10]}}
# probes that need a transformer run on a tiny GPT (token_stream data) instead; on the MLP each refuses in one
# line holding this fragment (test_transformer_probes_refuse_the_mlp_in_one_line)
NEEDS_TRANSFORMER = {"massive_activations": "no attention layers or residual stream"}
GPT_SPEC = {"name": "gpt", "kwargs": {"vocab_size": 16, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 16}}
GPT_DATA = {"name": "token_stream", "kwargs": {"vocab_size": 16, "block_size": 8, "n_sequences": 24}}


def test_every_probe_has_conformance_settings():
    assert set(PROBES) - {"test.counting"} <= set(FAST), "add the new probe to FAST and BAD"


@pytest.fixture(scope="module")
def context_parts():
    model = models.build_model(SPEC)
    x, y = models.build_data({"name": "digits"})
    batches = as_batches((x[:120], y[:120]), 60)
    states = {}
    for step in (0, 1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(step + p.numel())))
        states[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return model, batches, states


@pytest.fixture(scope="module")
def gpt_parts():
    """(model, batches, states) of a tiny GPT, as ``context_parts`` for the probes of NEEDS_TRANSFORMER."""
    torch.manual_seed(0)
    model = models.build_model(GPT_SPEC)
    batches = as_batches(models.build_data(GPT_DATA), 12)
    states = {step: {k: v.clone() for k, v in model.state_dict().items()} for step in (0, 1, 2)}
    return model, batches, states


@pytest.mark.parametrize("name", sorted(NEEDS_TRANSFORMER))
def test_transformer_probes_refuse_the_mlp_in_one_line(name, context_parts):
    model, batches, states = context_parts
    with pytest.raises(ValueError, match=NEEDS_TRANSFORMER[name]) as info:
        PROBES[name](**FAST[name]).run(_ctx(model, batches, states))
    assert "\n" not in str(info.value) and "; " in str(info.value)  # what is wrong; how to fix it


def _ctx(model, batches, states, optimizer_state=None):
    return ProbeContext(model=model, data=batches, loss="cross_entropy", step=2, lr=0.1, steps=(0, 1, 2),
                        state_at=lambda s: states[s], optimizer_state=optimizer_state)


def _adam_state(model):
    """An Adam state after 3 steps, for a probe that reads one (its second moments are positive)."""
    return {n: {"exp_avg_sq": p.detach() ** 2 + 1e-3, "step": torch.tensor(3.0)} for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(FAST))
def test_probe_conformance(name, context_parts, tmp_path, request):
    model, batches, states = request.getfixturevalue("gpt_parts") if name in NEEDS_TRANSFORMER else context_parts
    cls = PROBES[name]
    cls(**({"to_step": 0} if name in ("interpolate", "curve") else {}))  # defaults (these need a target step)
    with pytest.raises(ValueError):
        cls(**{**FAST[name], **BAD[name]})
    probe = cls(**FAST[name])
    model.train()
    next(iter(model.children())).eval()  # a mixed train/eval state must come back exactly
    flags = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    optimizer_state = _adam_state(model) if cls.needs_optimizer_state else None
    first = probe.run(_ctx(model, batches, states, optimizer_state))
    second = probe.run(_ctx(model, batches, states, optimizer_state))

    # the user's model is untouched: parameters, buffers and every train/eval flag
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags
    # deterministic under its seed
    assert first.values.keys() == second.values.keys()
    for k in first.values:
        np.testing.assert_array_equal(first.values[k], second.values[k], err_msg=f"{name}: {k}")
    # dims agree with shapes; coords label existing axes
    for k, v in first.values.items():
        assert len(first.dims[k]) == np.ndim(v)
    for c in first.coords:
        assert any(c in d for d in first.dims.values()), f"{name}: coord {c} labels no axis"
    # survives the results store
    with ResultsStore(tmp_path / "r.results.h5", run_fingerprint="f" * 16) as store:
        store.write(first, key=probe.config_hash(), data_fingerprint="d")
        back, info = store.read(name, probe.config_hash(), 2)
    assert info["status"] == "complete" and back.config == probe.config()
    for k, v in first.values.items():
        if np.asarray(v).dtype.kind in "fiub":
            np.testing.assert_array_equal(np.asarray(back.values[k]), np.asarray(v), err_msg=f"{name}: {k}")
        else:
            assert list(np.asarray(back.values[k]).ravel()) == list(np.asarray(v).ravel())
    # the config hash is stable and sensitive
    assert probe.config_hash() == cls(**FAST[name]).config_hash()
    assert dataclasses.is_dataclass(probe) and probe.__dataclass_params__.frozen


# -- declarations: report section, figure, plot kinds ------------------------------------------------------------
def _lossatlas_probes() -> dict:
    return {name: cls for name, cls in PROBES.items() if cls.__module__.startswith("lossatlas.")}


def test_every_probe_declares_a_known_section_and_figure():
    import lossatlas.viz.figures  # noqa: F401  (registers every figure: the viz package loads them on first use)
    from lossatlas.viz.registry import PAPER, PLOTLY, TRAINING
    from lossatlas.viz.report import SECTIONS

    probes = _lossatlas_probes()
    assert set(probes) >= set(FAST)
    for name, cls in probes.items():
        assert "section" in vars(cls) and cls.section in SECTIONS, f"{name}: section {cls.section!r}"
        assert "figure" in vars(cls), f"{name} declares no figure (None if it has none)"
        assert cls.figure is None or (cls.figure in PAPER and cls.figure in PLOTLY), f"{name}: figure {cls.figure!r}"
    # every figure viz draws belongs to a probe (or to the run's log), as matplotlib and as plotly figures
    assert set(PAPER) == set(PLOTLY) == {cls.figure for cls in probes.values() if cls.figure} | {TRAINING}


def test_plot_kinds_and_report_places_come_from_the_declarations(monkeypatch):
    from lossatlas.analysis import kinds
    from lossatlas.probes.base import Probe

    drawn = [n for n, c in _lossatlas_probes().items() if c.figure is not None]
    got = kinds.plot_kinds()
    assert got[0] == "training" and sorted(got[1:]) == sorted(drawn)
    with pytest.raises(ValueError, match="known kinds: training, "):
        kinds.check_kind("no-such-kind")

    class Curvy(Probe):
        name = "test.curvy"
        section = "curvature"
        title = "A curvy test probe"
        figure = "hessian"
        usage = "--step 3"

    monkeypatch.setitem(PROBES, Curvy.name, Curvy)
    got = kinds.plot_kinds()
    last_curvature = max(got.index(n) for n in drawn if PROBES[n].section == "curvature")
    assert got.index("test.curvy") == last_curvature + 1  # section order, then registration order
    assert kinds.check_kind("test.curvy") == "test.curvy"
    assert kinds.figure_of("test.curvy") == "hessian" and kinds.section_of("test.curvy") == "curvature"
    assert kinds.title_of("test.curvy") == "A curvy test probe" and kinds.title_of("hessian") == "hessian"
    assert kinds.command_of("test.curvy") == "lossatlas test.curvy RUN --step 3"
    assert kinds.command_of("trajectory") == "lossatlas trajectory RUN"
    # a probe nobody registered: the "other" section, drawn as its stored scalars
    assert kinds.section_of("unregistered") == "other" and kinds.figure_of("unregistered") == "unregistered"
