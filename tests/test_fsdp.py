"""Sharded Hessian products and estimators: FSDP2 under torchrun (gloo, 2 ranks) against single-process exact answers.

The sharded path's finite-difference products carry a measured error bound δ (Richardson); the top
eigenvalues, the Hutchinson trace and the SLQ moments from 2 FSDP ranks must lie within the bounds
they report of the exact (double-backward) single-process answers with the same random vectors.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lossatlas.curvature import HessianOperator
from lossatlas.curvature.sharded import ShardedHessianOperator, run_sharded_hessian
from lossatlas.errors import UserError
from lossatlas.estimators import lanczos_eigs, lanczos_tridiagonal, tridiag_quadrature
from lossatlas.estimators.sharded_vectors import (
    ShardedSpace,
    sharded_hutchinson_trace,
    sharded_lanczos_eigs,
    sharded_slq_density,
)

sys.path.insert(0, str(Path(__file__).parent))
from _fsdp_worker import tiny_gpt2  # noqa: E402

TORCHRUN = Path(sys.executable).with_name("torchrun")
WORKER = Path(__file__).with_name("_fsdp_worker.py")


class Whole:
    """An exact operator on whole vectors, with the one-process space (same random vectors as the shards)."""

    def __init__(self, H):
        self.H, self.shape, self.dtype, self.device = H, H.shape, H.dtype, H.device
        self.space = ShardedSpace.whole(H.shape[0])

    def __matmul__(self, V):
        return self.H @ V


def _spectrum_matrix(P=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.tensor([9.0, 7.0, 6.5]), torch.linspace(-1.0, 1.0, P - 3)]).double()
    return (Q * lam) @ Q.T, lam


def test_probes_do_not_depend_on_the_sharding():
    """A rank's entries of a random vector are the one-process vector's entries at its segments."""
    P = 200_000  # spans 4 chunks of 2^16
    whole = ShardedSpace.whole(P).probes(range(2), "rademacher", 7, torch.float64, "cpu")
    segs = [(5, 10), (65_530, 20), (150_000, 50_000)]
    part = ShardedSpace(P, segs).probes(range(2), "rademacher", 7, torch.float64, "cpu")
    expect = torch.cat([whole[a : a + n] for a, n in segs])
    assert torch.equal(part, expect)
    assert set(whole.unique().tolist()) == {-1.0, 1.0}
    other = ShardedSpace.whole(P).probes(range(2), "rademacher", 8, torch.float64, "cpu")
    assert not torch.equal(whole, other)


def test_sharded_estimators_on_one_process_match_the_dense_answers():
    A, lam = _spectrum_matrix()
    top = sharded_lanczos_eigs(A, 3, tol=1e-10)
    np.testing.assert_allclose(top.eigenvalues, [9.0, 7.0, 6.5], atol=1e-9)
    assert top.converged.all() and top.matvecs <= 60
    tr = sharded_hutchinson_trace(A, 24, seed=3)
    V = ShardedSpace.whole(60).probes(range(24), "rademacher", 3, torch.float64, "cpu")
    np.testing.assert_allclose(tr.samples, ((A @ V) * V).sum(0).numpy(), rtol=1e-12)
    assert tr.product_bound == 0.0
    dens = sharded_slq_density(A, num_probes=3, num_steps=20, seed=4, grid_len=300)
    V0 = ShardedSpace.whole(60).probes(range(3), "rademacher", 4, torch.float64, "cpu")
    alpha, beta = lanczos_tridiagonal(A, V0, 20)
    nodes, weights = tridiag_quadrature(alpha, beta)
    np.testing.assert_allclose(dens.nodes, nodes, atol=1e-9)
    np.testing.assert_allclose(dens.weights, weights, atol=1e-9)


def _gpt2_case(tmp_path=None):
    torch.manual_seed(0)
    model = tiny_gpt2()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 32, (6, 10), generator=g)
    batches = [(x[:2], x[:2]), (x[2:4], x[2:4]), (x[4:], x[4:])]  # 3 batches: one rank runs a weight-0 pass
    if tmp_path is not None:
        torch.save(model.state_dict(), tmp_path / "state.pt")
        torch.save(batches, tmp_path / "data.pt")
    return model, batches


def test_finite_difference_product_within_its_measured_bound_one_process():
    model, batches = _gpt2_case()
    H = HessianOperator(model, batches, "causal_lm", path="double_backward")
    A = ShardedHessianOperator(model, batches, "causal_lm")  # no FSDP: exact double backward, own devices
    F = ShardedHessianOperator(model, batches, "causal_lm", path="finite_difference", fd_checks=4)
    before = [p.detach().clone() for p in model.parameters()]
    V = torch.randn(H.shape[0], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = H @ V
    np.testing.assert_allclose((A @ V).numpy(), exact.numpy(), rtol=1e-10, atol=1e-12)
    err = torch.linalg.vector_norm(F @ V - exact, dim=0) / torch.linalg.vector_norm(V, dim=0)
    assert 0 < F.product_error < 1e-5 * float(torch.linalg.vector_norm(exact, dim=0).max())
    assert bool((err <= F.product_error).all()), (err, F.product_error)
    assert F.fd_step < F.fd_step0  # the calibration shortened ε₀ (truncation dominated there)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # θ restored bit for bit


def test_device_map_model_parameters_stay_on_their_devices():
    """Vectors on one device, each parameter's slice moved to that parameter's device (one device on a CPU)."""
    devices = ["cpu", "cpu"]
    if torch.cuda.device_count() >= 2:
        devices = ["cuda:0", "cuda:1"]

    class Spread(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 4).double().to(devices[0])
            self.b = torch.nn.Linear(4, 2).double().to(devices[1])

        def forward(self, x):
            return self.b(torch.tanh(self.a(x.to(devices[0]))).to(devices[1]))

    torch.manual_seed(0)
    model = Spread()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 2, (7,))
    op = ShardedHessianOperator(model, [(x, y.to(devices[1]))], "cross_entropy", vector_device="cpu",
                                input_device=devices[0])
    assert [t.device.type for t in op.unflatten(torch.zeros(op.num_params, dtype=torch.float64))] == \
        [torch.device(d).type for d in (devices[0],) * 2 + (devices[1],) * 2]
    cpu_model = Spread().cpu()
    cpu_model.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    H = HessianOperator(cpu_model, [(x, y)], "cross_entropy", path="double_backward")
    V = torch.randn(op.num_params, 3, dtype=torch.float64)
    np.testing.assert_allclose((op @ V).numpy(), (H @ V).numpy(), rtol=1e-10, atol=1e-12)


def test_bad_settings_are_refused():
    model, batches = _gpt2_case()
    with pytest.raises(UserError, match="path"):
        ShardedHessianOperator(model, batches, "causal_lm", path="forward_over_reverse")
    with pytest.raises(UserError, match="fd_step"):
        ShardedHessianOperator(model, batches, "causal_lm", fd_step=-1.0)
    with pytest.raises(UserError, match="--fsdp runs the hessian probe only"):
        run_sharded_hessian(type("P", (), {"name": "surface"})(), None)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to this Python")
def test_fsdp_two_ranks_equal_single_process_within_stated_bounds(tmp_path):
    model, batches = _gpt2_case(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    out = tmp_path / "out.npz"
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(WORKER),
                           str(tmp_path / "state.pt"), str(tmp_path / "data.pt"), str(out)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    report = json.loads(str(got["report"]))
    assert report["fsdp"] and report["world_size"] == 2 and report["path"] == "finite_difference"
    assert "#106637" in str(got["refused"])  # double backward refused under FSDP, with the reason
    P = report["num_params"]
    assert got["local_sizes"][0] < P  # rank 0 holds a shard, not the whole vector
    delta = report["product_error"]
    H = HessianOperator(model, batches, "causal_lm", path="double_backward")
    ref = Whole(H)

    # products: ‖Ãv − Hv‖ ≤ δ‖v‖, the vectors drawn by global position equal the one-process draw
    V = torch.from_numpy(got["probes"])
    assert torch.equal(V, ref.space.probes(range(3), "normal", 123, torch.float64, "cpu"))
    err = torch.linalg.vector_norm(torch.from_numpy(got["products"]) - H @ V, dim=0)
    assert 0 < delta < 1e-5 * float(torch.linalg.vector_norm(H @ V, dim=0).max() / V.norm(dim=0).max())
    assert bool((err <= delta * torch.linalg.vector_norm(V, dim=0)).all()), (err, delta)

    # top-3: within the reported bound (+ the exact run's own) of the single-process exact eigenvalues
    exact = lanczos_eigs(H, 3, tol=1e-11)
    gap = np.abs(got["top"] - exact.eigenvalues)
    print("top gap", gap, "bounds", got["top_bounds"], "delta", delta, "product err", err.numpy())
    assert (gap <= got["top_bounds"] + exact.error_bounds).all(), (gap, got["top_bounds"])
    assert (got["top_bounds"] < 1e-5 * np.abs(exact.eigenvalues)).all()
    y = torch.from_numpy(got["top_vectors"][:, 0])  # the gathered Ritz vector is an eigenvector of H
    assert float((H @ y - exact.eigenvalues[0] * y).norm()) < 1e-4

    # trace: the same 16 probes, exact products
    ref_tr = sharded_hutchinson_trace(ref, 16, seed=1)
    np.testing.assert_array_less(np.abs(got["trace_samples"] - ref_tr.samples),
                                 delta * P + 1e-9)  # Rademacher: ‖v‖² = P
    assert abs(float(got["trace"]) - ref_tr.value) <= float(got["trace_bound"]) + 1e-9

    # density: each run's first two quadrature moments within their stated bounds
    ref_d = sharded_slq_density(ref, num_probes=2, num_steps=12, sigma_squared=1e-3, grid_len=500, seed=2)
    nodes, weights, mb = got["nodes"], got["weights"], got["moment_bounds"]
    for j in (1, 2):
        m_got = (weights * nodes**j).sum(axis=1)
        m_ref = (ref_d.weights * ref_d.nodes**j).sum(axis=1)
        assert (np.abs(m_got - m_ref) <= mb[:, j - 1] + 1e-9 * np.abs(m_ref)).all(), (j, m_got - m_ref, mb)
    np.testing.assert_allclose(nodes[:, -1], ref_d.nodes[:, -1], rtol=1e-5)  # the extreme nodes converge first
