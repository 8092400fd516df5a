"""Memory at scale: finite-difference HVPs within their stated error, bf16 models analysed
in float32, the Lanczos basis kept on another device than the operator."""

import pytest
import torch
from torch import nn

from lossatlas.curvature import GGNOperator, HessianOperator
from lossatlas.estimators import lanczos_eigs


def _case(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    x = torch.randn(40, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (40,), generator=g)
    return model, [(x[:25], y[:25]), (x[25:], y[25:])]


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-8), (torch.float32, 1e-3)])
def test_finite_difference_hvp_within_its_error_bound(dtype, rtol):
    model, data = _case(dtype)
    exact = HessianOperator(model, data, "cross_entropy", path="double_backward", dtype=torch.float64)
    fd = HessianOperator(model, data, "cross_entropy", path="finite_difference")
    V = torch.randn(exact.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = exact @ V
    got = (fd @ V.to(dtype)).double()
    assert fd.path == "finite_difference"
    err = float((got - ref).norm() / ref.norm())
    assert err < rtol, err  # ε_mach^{2/3}: ~4e-11 in float64, ~2e-5 in float32 (times the problem's constants)


def test_finite_difference_is_refused_for_the_ggn():
    model, data = _case()
    from lossatlas.errors import UserError

    op = GGNOperator(model, data, "cross_entropy", path="finite_difference")
    with pytest.raises(UserError, match="Hessian products only"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)


def test_bf16_model_analysed_with_float32_accumulation():
    model, data = _case(torch.float32)
    bf16 = nn.Sequential(*[m for m in model]).to(torch.bfloat16)  # a bf16 checkpoint
    as32 = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    as32.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()})
    op_bf16 = HessianOperator(bf16, data, "cross_entropy", dtype=torch.float32)
    op_32 = HessianOperator(as32, data, "cross_entropy")
    assert op_bf16.dtype == torch.float32 and next(bf16.parameters()).dtype == torch.bfloat16
    a = lanczos_eigs(op_bf16, k=2, tol=1e-6, seed=3).eigenvalues
    b = lanczos_eigs(op_32, k=2, tol=1e-6, seed=3).eigenvalues
    assert a.tolist() == b.tolist()  # the same float32 computation on the bf16 weights, bit for bit


def test_lanczos_basis_on_a_given_device():
    model, data = _case()
    op = HessianOperator(model, data, "cross_entropy")
    here = lanczos_eigs(op, k=3, tol=1e-10, seed=0)
    offloaded = lanczos_eigs(op, k=3, tol=1e-10, seed=0, basis_device="cpu")
    assert offloaded.eigenvectors.device.type == "cpu"
    torch.testing.assert_close(torch.as_tensor(offloaded.eigenvalues), torch.as_tensor(here.eigenvalues), rtol=1e-12, atol=0)
