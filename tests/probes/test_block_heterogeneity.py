"""block_heterogeneity: block spectra and JS⁰ against closed forms (Zhang et al. 2024).

A model whose loss is L = ½ Σ_i Σ_k c_ik² w_ik² has a diagonal Hessian with known blocks diag(c_i²). For a
diagonal block and a Rademacher start, SLQ with as many steps as the block's size is exact: the Ritz values are
the eigenvalues and every weight is 1/n, so each block's smoothed density — and the JS divergences between them —
have a closed form on the grid, computed here independently (scipy's Jensen–Shannon distance, squared).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from torch import nn

from lossatlas.probes import ProbeContext
from lossatlas.probes.block_heterogeneity import (
    BlockHeterogeneity,
    SliceOperator,
    common_grid_densities,
    heterogeneity_blocks,
    js0,
    js_divergence_matrix,
)

SPECTRA = {"a": [1.0, 2.0, 3.0], "b": [3.0, 1.0, 2.0], "c": [10.0, 20.0], "d": [0.5], "e": [4.0, 4.0, 4.0, 4.0]}


class _Diagonal(nn.Module):
    """Outputs (c_i ⊙ w_i)_i for every example: under half_sse with y = 0, H = diag(c_i²) block by block."""

    def __init__(self, spectra):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.ws = nn.ParameterDict({k: nn.Parameter(torch.randn(len(v), generator=gen, dtype=torch.float64))
                                    for k, v in spectra.items()})
        for k, v in spectra.items():
            self.register_buffer(f"c_{k}", torch.tensor(v, dtype=torch.float64).sqrt())

    def forward(self, x):
        out = torch.cat([getattr(self, f"c_{k}") * w for k, w in self.ws.items()])
        return out.expand(x.shape[0], -1)


def _reference(spectra, grid_len, sigma_squared):
    """Each block's density (1/n) Σ_k g_σ(t − λ_k) on the documented grid, and scipy's JS (squared distance)."""
    lo = min(min(v) for v in spectra.values())
    hi = max(max(v) for v in spectra.values())
    width = hi - lo
    sigma = math.sqrt(sigma_squared) * width
    grid = np.linspace(lo - 0.05 * width - 4 * sigma, hi + 0.05 * width + 4 * sigma, grid_len)
    dens = np.array([np.mean([np.exp(-(grid - lam) ** 2 / (2 * sigma ** 2)) for lam in v], axis=0)
                     for v in spectra.values()])
    dens /= dens.sum(axis=1, keepdims=True) * (grid[1] - grid[0])
    n = len(spectra)
    with np.errstate(invalid="ignore"):  # scipy takes √ of a rounding-negative value for identical inputs: NaN
        js = np.array([[jensenshannon(dens[i], dens[j]) ** 2 for j in range(n)] for i in range(n)])
    return grid, dens, np.nan_to_num(js, nan=0.0)


@pytest.mark.parametrize("sigma_squared", [1e-4, 1e-2])
def test_block_spectra_and_js0_match_the_closed_form(sigma_squared):
    model = _Diagonal(SPECTRA)
    data = [(torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4, len(sum(SPECTRA.values(), [])),
                                                                  dtype=torch.float64))]
    probe = BlockHeterogeneity(num_probes=3, num_steps=4, sigma_squared=sigma_squared, grid_len=800)
    res = probe.run(ProbeContext(model=model, data=data, loss="half_sse", step=0))
    names = [f"ws.{k}" for k in SPECTRA]
    assert list(res.coords["block"]) == names
    assert res.values["block_size"].tolist() == [len(v) for v in SPECTRA.values()]
    np.testing.assert_allclose(res.values["block_top_ritz"], [max(v) for v in SPECTRA.values()], rtol=1e-12)
    grid, dens, js = _reference(SPECTRA, 800, sigma_squared)
    np.testing.assert_allclose(res.coords["grid"], grid, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(res.values["block_density"], dens, rtol=1e-8, atol=1e-10 * dens.max())
    np.testing.assert_allclose(res.values["js_matrix"], js, rtol=1e-7, atol=1e-12)
    pairs = js[np.triu_indices(len(SPECTRA), 1)]
    assert res.scalar("js0") == pytest.approx(pairs.mean(), rel=1e-7)
    assert res.scalar("js0_distance") == pytest.approx(np.sqrt(pairs).mean(), rel=1e-7)
    # the same spectrum in another order: JS 0; disjoint spectra far apart: JS → ln 2
    assert res.values["js_matrix"][0, 1] == pytest.approx(0.0, abs=1e-12)
    if sigma_squared == 1e-4:
        assert res.values["js_matrix"][0, 2] == pytest.approx(math.log(2), rel=1e-9)


def test_js_is_scale_invariant_and_bounded():
    rng = np.random.default_rng(0)
    nodes = [rng.normal(size=(2, 5)) * s for s in (1.0, 3.0, 0.2)]
    weights = [np.full((2, 5), 0.2) for _ in nodes]
    _, d1, _ = common_grid_densities(nodes, weights, grid_len=500)
    _, d2, _ = common_grid_densities([7.0 * n for n in nodes], weights, grid_len=500)
    j1, j2 = js_divergence_matrix(d1), js_divergence_matrix(d2)
    np.testing.assert_allclose(j1, j2, rtol=1e-9, atol=1e-14)
    assert np.all(j1 >= 0) and np.all(j1 <= math.log(2) + 1e-12) and np.allclose(np.diag(j1), 0)
    assert js0(j1) == pytest.approx(np.mean([j1[0, 1], j1[0, 2], j1[1, 2]]))


class _FusedAttention(nn.Module):
    """One attention layer with a fused qkv Linear ((3d, d) weight: rows q, k, v) and a classifier."""

    def __init__(self, d=4, classes=3):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
        return self.head((att @ v).mean(dim=1))


def test_fused_qkv_blocks_are_the_principal_submatrices_of_the_dense_hessian():
    torch.manual_seed(0)
    model = _FusedAttention().double()
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    blocks = heterogeneity_blocks(model)
    assert [b.name for b in blocks] == ["qkv.weight[q]", "qkv.weight[k]", "qkv.weight[v]", "qkv.bias[q]",
                                        "qkv.bias[k]", "qkv.bias[v]", "head.weight", "head.bias"]
    # rows 4:8 of the (12, 4) weight are K
    assert blocks[1].index.tolist() == list(range(16, 32))
    W = model.qkv.weight.detach().clone()

    def loss_of(flat):
        params = {**dict(model.named_parameters()), "qkv.weight": flat.reshape(W.shape)}
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    H = torch.autograd.functional.hessian(loss_of, W.reshape(-1))
    probe = BlockHeterogeneity(dtype="float64")
    ctx = ProbeContext(model=model, data=[(x, y)], loss="cross_entropy")
    for b in blocks[:3]:
        op = probe.block_operator(ctx, [(x, y)], b, first=True)
        assert isinstance(op, SliceOperator) and op.shape == (16, 16)
        dense = op @ torch.eye(16, dtype=torch.float64)
        np.testing.assert_allclose(dense.numpy(), H[b.index][:, b.index].numpy(), rtol=1e-9, atol=1e-12)
        e = torch.zeros(16, dtype=torch.float64)
        e[3] = 1.0
        np.testing.assert_allclose((op @ e).numpy(), H[b.index][:, b.index][:, 3].numpy(), rtol=1e-9, atol=1e-12)


def test_hugging_face_gpt2_c_attn_is_split_by_columns():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=8)
    model = transformers.GPT2LMHeadModel(cfg)
    blocks = {b.name: b for b in heterogeneity_blocks(model)}
    k = blocks["transformer.h.0.attn.c_attn.weight[k]"]
    assert k.index.tolist() == torch.arange(8 * 24).reshape(8, 24)[:, 8:16].reshape(-1).tolist()
    assert blocks["transformer.h.0.attn.c_attn.bias[v]"].index.tolist() == list(range(16, 24))
    assert "transformer.h.0.attn.c_proj.weight" in blocks and "transformer.wte.weight" in blocks
    assert "transformer.h.0.attn.c_attn.weight" not in blocks
    unsplit = {b.name for b in heterogeneity_blocks(model, split_qkv=False, select=r"c_attn")}
    assert unsplit == {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"}


def test_layers_partition_and_select():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert [(b.name, b.params) for b in heterogeneity_blocks(model, "layers")] == [
        ("0", ("0.weight", "0.bias")), ("2", ("2.weight", "2.bias"))]
    assert [b.name for b in heterogeneity_blocks(model, select="weight")] == ["0.weight", "2.weight"]
    with pytest.raises(ValueError, match="matches no block"):
        heterogeneity_blocks(model, select="nothing")


def test_bad_settings_are_refused():
    for bad in ({"partition": "atoms"}, {"num_probes": 0}, {"sigma_squared": 0.0}, {"select": "("},
                {"grid_len": 3}, {"split_qkv": "yes"}):
        with pytest.raises(ValueError):
            BlockHeterogeneity(**bad)


def test_experiment_tiny_configuration(tmp_path):
    """experiments/block_heterogeneity.py end to end in seconds: summary, figure, verdict."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from test_experiments import load
    finally:
        sys.path.pop(0)
    s = load("block_heterogeneity").main(["--tiny", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["experiment"] == "block_heterogeneity" and on_disk["claim"] and on_disk["verdict"]
    assert set(s["ours"]) == {"gpt", "cnn"}
    for case in s["ours"].values():
        assert 0 <= case["js0"] <= math.log(2) and case["num_blocks"] >= 2
    assert (tmp_path / "block_heterogeneity.png").stat().st_size > 1000


@pytest.mark.slow
def test_experiment_transformer_blocks_are_more_heterogeneous_than_cnn_blocks(tmp_path):
    """Zhang et al. 2024 at CPU scale: JS⁰ of a small GPT at initialization exceeds a small CNN's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from test_experiments import load
    finally:
        sys.path.pop(0)
    s = load("block_heterogeneity").main(["--quick", "--out", str(tmp_path)])
    assert s["verdict"]["gpt_more_heterogeneous"], s["verdict"]
    assert s["ours"]["gpt"]["js0"] > 1.5 * s["ours"]["cnn"]["js0"], s["verdict"]


def test_figures_draw_every_block_density_and_the_js_matrix():
    from lossatlas.viz.figures import interactive_figures, paper_figure

    model = _Diagonal(SPECTRA)
    data = [(torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2, 13, dtype=torch.float64))]
    res = BlockHeterogeneity(num_steps=4, grid_len=200).run(ProbeContext(model=model, data=data, loss="half_sse",
                                                                          step=0))
    fig = paper_figure("block_heterogeneity", [res])
    densities, matrix = fig.axes[0], fig.axes[1]
    assert len(densities.get_lines()) == len(SPECTRA)
    np.testing.assert_allclose(matrix.get_images()[0].get_array(), res.values["js_matrix"])
    figs = interactive_figures("block_heterogeneity", [res])
    assert len(figs) == 2 and len(figs[0].data) == len(SPECTRA)
