"""Closure losses ``loss_fn(model, batch)``: Hessian and surface against dense float64 brute force; trust rules.

The closure is a physics-informed loss with a regulariser: data MSE + the squared residual of the ODE
u'(x₁) = u (the inputs' gradient, taken inside the closure) + λ‖θ‖². The reference builds the same loss as a
function of the flat parameter vector with ``torch.func.functional_call`` and takes its Hessian by
``torch.autograd.functional.hessian``; batches are weighted by their size (or the count the closure returns).
"""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import lossatlas
from lossatlas import trust
from lossatlas.curvature import make_operator
from lossatlas.errors import UserError
from lossatlas.losses import LossClosure, resolve_loss_spec

DT = torch.float64
LAM = 1e-2


def _pinn_terms(u_of_x, x: torch.Tensor, y: torch.Tensor, params) -> torch.Tensor:
    """MSE(u, y) + mean (∂u/∂x₁ − u)² + λ Σ ‖θ‖², u = u_of_x(x) (x gets grad here)."""
    x = x.clone().requires_grad_(True)
    u = u_of_x(x)
    du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
    return ((u - y) ** 2).mean() + ((du[:, 0] - u[:, 0]) ** 2).mean() + LAM * sum((p**2).sum() for p in params)


def pinn(model, batch):
    """The closure under test."""
    x, y = batch
    return _pinn_terms(model, x, y, model.parameters())


def _case(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).to(DT)
    X = torch.randn(23, 2, dtype=DT)
    Y = torch.randn(23, 1, dtype=DT)
    batches = [(X[:10], Y[:10]), (X[10:20], Y[10:20]), (X[20:], Y[20:])]  # 10, 10, 3
    return model, batches


def _reference(model, batches, weights):
    """(f, θ₀): L(θ) = Σ_b w_b L_b(θ) on the flat θ, by functional_call, and the flat point."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def f(flat):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[i:i + s.numel()].reshape(s)
            i += s.numel()
        return sum(w * _pinn_terms(lambda x: torch.func.functional_call(model, params, (x,)), x, y, params.values())
                   for (x, y), w in zip(batches, weights))

    return f, theta0


def test_closure_hessian_equals_dense_brute_force():
    model, batches = _case()
    H = make_operator("hessian", model, batches, pinn)
    dense = H @ torch.eye(H.shape[0], dtype=DT)
    f, theta0 = _reference(model, batches, [10 / 23, 10 / 23, 3 / 23])
    want = torch.autograd.functional.hessian(f, theta0)
    assert float((dense - want).abs().max()) <= 1e-10 * float(want.abs().max())
    loss, grad = H.loss_and_gradient()
    assert abs(loss - float(f(theta0).detach())) <= 1e-12 * abs(loss)


def test_closure_returning_a_count_is_weighted_by_it():
    model, batches = _case(1)
    counts = [7, 1, 4]  # e.g. the terms a contrastive loss counts per batch

    def counted(m, batch):
        b = next(i for i, (x, _) in enumerate(batches) if x.shape == batch[0].shape and torch.equal(x, batch[0]))
        return pinn(m, batch), counts[b]

    op = make_operator("hessian", model, batches, counted)
    dense = op @ torch.eye(op.shape[0], dtype=DT)
    f, theta0 = _reference(model, batches, [c / 12 for c in counts])
    want = torch.autograd.functional.hessian(f, theta0)
    assert float((dense - want).abs().max()) <= 1e-10 * float(want.abs().max())


def test_hessian_spectrum_and_surface_with_a_closure_equal_brute_force():
    model, batches = _case(2)
    X, Y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    f, theta0 = _reference(model, batches, [10 / 23, 10 / 23, 3 / 23])
    want = torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, theta0)).flip(0)[:2]
    res = lossatlas.hessian_spectrum(model, (X, Y), loss=pinn, batch_size=10, top_k=2)
    np.testing.assert_allclose(res.values["top_eigenvalues"], want.numpy(), rtol=1e-6)
    assert res.meta["loss"] == "closure:pinn"

    surf = lossatlas.surface(model, (X, Y), loss=pinn, batch_size=10, dims=1, xrange=(-1, 1, 5))
    d = torch.as_tensor(surf.values["direction_x"])
    names = surf.meta["param_names"]
    assert names == [n for n, _ in model.named_parameters()]
    brute = np.array([float(f(theta0 + a * d).detach()) for a in surf.coords["x"]])
    np.testing.assert_allclose(surf.values["loss"], brute, rtol=1e-12)
    assert np.isnan(surf.values["accuracy"]).all()  # a closure gives no predictions
    q = surf.meta["quadratic"]["x"]  # the Taylor check's dᵀHd comes from the closure too
    H = torch.autograd.functional.hessian(f, theta0)
    assert abs(q["hessian_curvature"] - float(d @ H @ d)) <= 1e-9 * abs(float(d @ H @ d))
    total = lossatlas.loss(model, (X, Y), loss=pinn, batch_size=10)
    assert abs(total.scalar("loss") - float(f(theta0).detach())) <= 1e-12 * float(f(theta0).detach())


def test_output_space_curvatures_refuse_a_closure_in_one_line():
    model, batches = _case()
    for kind in ("ggn", "fisher", "empirical_fisher"):
        with pytest.raises(UserError) as err:
            make_operator(kind, model, batches, pinn)
        assert "\n" not in str(err.value) and "closure" in str(err.value)


@pytest.fixture
def loss_module(tmp_path, monkeypatch):
    """A module ``closure_losses_mod`` on sys.path whose factory ``make(scale)`` returns a closure."""
    name = "closure_losses_mod"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import torch.nn.functional as F

        def make(scale=1.0):
            def loss_fn(model, batch):
                x, y = batch
                if not y.is_floating_point():  # class labels: cross-entropy
                    return scale * F.cross_entropy(model(x), y)
                return scale * ((model(x) - y) ** 2).mean()
            return loss_fn
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_factory_spec_trust_rules(loss_module, tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSATLAS_CONFIG_DIR", str(tmp_path / "cfg"))
    spec = {"factory": f"{loss_module}:make", "kwargs": {"scale": 2.0}}
    text = json.dumps(spec)
    # a spec the caller types (--loss) is trusted and built
    got = resolve_loss_spec(text)
    assert isinstance(got, LossClosure) and str(got) == f"closure:{loss_module}:make"
    model, batches = _case()
    x, y = batches[0]
    with torch.no_grad():
        assert float(got.fn(model, (x, y))) == pytest.approx(2.0 * float(((model(x) - y) ** 2).mean()), rel=1e-15)
    # stored in a run file, unsigned: refused before anything is imported
    sys.modules.pop(loss_module, None)
    with pytest.raises(UserError, match="--trust-factory") as err:
        resolve_loss_spec(text, stored=True, signatures=None, source="run.h5")
    assert "\n" not in str(err.value) and loss_module not in sys.modules
    # ... built with --trust-factory, or with this user's signature over the loss role
    assert isinstance(resolve_loss_spec(text, stored=True, source="run.h5", trust_factory=True), LossClosure)
    signatures = trust.sign_specs({"loss": spec})
    assert isinstance(resolve_loss_spec(text, stored=True, signatures=signatures, source="run.h5"), LossClosure)
    # a signature over another spec (or another role) does not carry over
    other = trust.sign_specs({"loss": {"factory": f"{loss_module}:make"}})
    with pytest.raises(UserError, match="--trust-factory"):
        resolve_loss_spec(text, stored=True, signatures=other, source="run.h5")
    # names stay names; a spec without a factory is refused in one line
    assert resolve_loss_spec("mse") == "mse"
    with pytest.raises(UserError, match="names no factory"):
        resolve_loss_spec('{"name": "mse"}')


def test_cli_spec_reaches_the_probes(loss_module, tiny_run, tmp_path):
    from lossatlas.analysis.runner import RunOptions, run_probe
    from lossatlas.probes import get_probe

    spec = json.dumps({"factory": f"{loss_module}:make", "kwargs": {"scale": 3.0}})
    opts = dict(steps="last", batch_size=100, results_path=str(tmp_path / "r.h5"))
    got = run_probe(tiny_run, get_probe("loss")(), RunOptions(loss=spec, **opts)).results[-1]
    plain = run_probe(tiny_run, get_probe("loss")(), RunOptions(loss="cross_entropy", **opts)).results[-1]
    # batches weighted by their size: 3 × the example mean of the cross-entropy
    assert got.scalar("loss") == pytest.approx(3.0 * plain.scalar("loss"), rel=1e-6)
    assert np.isnan(got.scalar("accuracy")) and got.meta["loss"] == f"closure:{loss_module}:make"
