"""The run file and the results file (lossatlas/store/): exact round trips, live reading,
crash safety under SIGKILL, refusals, and labelled results (dimension scales)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from lossatlas.errors import UserError
from lossatlas.probes.base import Result
from lossatlas.store import (
    FORMAT_VERSION,
    ResultsStore,
    RunReader,
    RunWriter,
    default_results_path,
    file_kind,
    open_run,
)

CHILD = Path(__file__).with_name("_store_writer_child.py")
sys.path.insert(0, str(CHILD.parent))
from _store_writer_child import expected_state  # noqa: E402

SPEC = {"name": "mlp", "kwargs": {"widths": [4, 8, 3]}}
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bit pattern (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    bits = _INT_OF_WIDTH[a.element_size()]
    return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """NaN (two payloads), ±inf, ±0.0, the smallest subnormal, the largest finite, a random tail."""
    fi = torch.finfo(dtype)
    smallest_subnormal = fi.smallest_normal * fi.eps
    base = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.5], dtype=dtype)
    extremes = torch.tensor([smallest_subnormal, -smallest_subnormal, fi.max, fi.min, fi.tiny], dtype=dtype)
    bits = _INT_OF_WIDTH[base.element_size()]
    odd_nan = base[:1].clone().view(bits).add_(1).view(dtype)  # a NaN with another payload
    tail = torch.randn(5, generator=torch.Generator().manual_seed(0)).to(dtype)
    return torch.cat([base, extremes, odd_nan, tail])


@pytest.fixture
def run_path(tmp_path: Path) -> Path:
    return tmp_path / "run.h5"


def test_every_dtype_round_trips_bit_for_bit(run_path: Path) -> None:
    params = {f"layer.{n}": special_values(d) for n, d in
              [("f64", torch.float64), ("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)]}
    params["matrix.T"] = torch.randn(3, 5, dtype=torch.float64).t()  # non-contiguous
    params["scalar"] = torch.tensor(-0.0, dtype=torch.bfloat16)  # 0-d
    params["empty"] = torch.zeros(0, 4)
    params["odd/name%"] = torch.arange(3.0)  # '/' and '%' in a key
    params["complex"] = torch.tensor([1 + 2j, float("nan")], dtype=torch.complex64)
    buffers = {"bn.num_batches_tracked": torch.tensor(2**62 + 1, dtype=torch.int64),
               "mask": torch.tensor([True, False, True]), "codes": torch.tensor([-128, 0, 127], dtype=torch.int8),
               "f8": torch.tensor([0.5, -448.0], dtype=torch.float8_e4m3fn)}
    with RunWriter(run_path, model_spec=SPEC, loss="mse") as w:
        w.write_checkpoint(7, params, buffers)
    ck = open_run(run_path).checkpoint(7)
    assert list(ck.params) == list(params) and list(ck.buffers) == list(buffers)
    for k, v in {**params, **buffers}.items():
        got = ck.state_dict()[k]
        if v.dtype == torch.float8_e4m3fn:
            assert got.dtype == v.dtype and torch.equal(got.view(torch.uint8), v.view(torch.uint8)), k
        else:
            assert same_bits(got, v), k
    # the special values really are special (the comparison above could not pass by accident)
    assert torch.isnan(ck.params["layer.bf16"][0]) and torch.signbit(ck.params["layer.f16"][4])
    assert ck.params["layer.f32"][7] != 0 and ck.params["layer.f32"][7].abs() < torch.finfo(torch.float32).tiny
    with h5py.File(run_path, "r") as f:  # bfloat16 as raw bits, dtype recorded
        ds = f["checkpoints/params/layer.bf16"]
        assert ds.dtype == np.uint16 and ds.attrs["torch_dtype"] == "bfloat16"
        assert "odd%2Fname%25" in f["checkpoints/params"]


def test_steps_attrs_and_header(run_path: Path) -> None:
    p = {"w": torch.zeros(2)}
    with RunWriter(run_path, model_spec=SPEC, data_spec={"name": "blobs"}, loss="cross_entropy",
                   optimizer={"name": "sgd", "lr": 0.1}, attrs={"seed": 3}) as w:
        w.write_checkpoint(0, {"w": torch.zeros(2)}, attrs={"epoch": 0, "lr": 0.1})
        w.write_checkpoint(10, {"w": torch.ones(2)}, attrs={"lr": 0.05, "momentum": np.float32(0.9)})
        w.write_checkpoint(1000, p)
        with pytest.raises(ValueError, match="already written"):
            w.write_checkpoint(10, p)
        with pytest.raises(ValueError, match="differs from earlier"):
            w.write_checkpoint(11, {"w": torch.zeros(3)})
        with pytest.raises(ValueError, match="missing from this checkpoint"):
            w.write_checkpoint(12, {"v": torch.zeros(2)})
        w.write_checkpoint(13, {"w": torch.full((2,), 13.0)})  # a refused write leaves the run consistent
    r = RunReader(run_path)
    assert (r.model_spec, r.data_spec, r.loss, r.optimizer, r.attrs) == (
        SPEC, {"name": "blobs"}, "cross_entropy", {"name": "sgd", "lr": 0.1}, {"seed": 3})
    assert r.steps() == [0, 10, 1000, 13]
    assert r.checkpoint_attrs(0) == {"step": 0, "epoch": 0.0, "lr": 0.1}
    assert r.checkpoint_attrs(10) == {"step": 10, "lr": 0.05, "momentum": float(np.float32(0.9))}
    assert r.checkpoint_attrs(1000) == {"step": 1000}
    assert torch.equal(r.checkpoint(13).params["w"], torch.full((2,), 13.0))
    with pytest.raises(UserError, match=r"no checkpoint at step 12; nearest steps: 0, 10, 13, 1000"):
        r.checkpoint(12)
    assert r.fingerprint() == RunReader(run_path).fingerprint() and len(r.fingerprint()) == 16
    assert file_kind(run_path) == "run" and r.size_bytes() == run_path.stat().st_size
    assert default_results_path(run_path) == run_path.with_name("run.results.h5")


def test_optimizer_state_round_trip(run_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    names = {id(p): n for n, p in model.named_parameters()}

    def state_by_name() -> dict:
        return {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}

    def params_buffers() -> tuple[dict, dict]:
        return ({n: p.detach().clone() for n, p in model.named_parameters()},
                {n: b.clone() for n, b in model.named_buffers()})

    with RunWriter(run_path, model_spec=SPEC) as w:
        w.write_checkpoint(0, *params_buffers(), optimizer_state=None)  # Adam has no state yet
        saved = {}
        for step in (1, 2):
            opt.zero_grad()
            model(torch.randn(8, 3)).square().mean().backward()
            opt.step()
            saved[step] = (params_buffers(), state_by_name())
            w.write_checkpoint(step, *saved[step][0], optimizer_state=saved[step][1])
    r = RunReader(run_path)
    assert r.checkpoint(0, optimizer_state=True).optimizer_state is None
    assert r.checkpoint(2).optimizer_state is None  # not asked for
    for step, ((params, buffers), state) in saved.items():
        ck = r.checkpoint(step, optimizer_state=True)
        assert ck.state_dict().keys() == model.state_dict().keys()
        assert all(same_bits(ck.params[k], v) for k, v in params.items())
        assert same_bits(ck.buffers["1.num_batches_tracked"], buffers["1.num_batches_tracked"])
        assert ck.optimizer_state.keys() == state.keys()
        for n, s in state.items():
            assert ck.optimizer_state[n].keys() == {"step", "exp_avg", "exp_avg_sq"}
            assert all(same_bits(ck.optimizer_state[n][k], v) for k, v in s.items())
    assert not torch.equal(saved[1][1]["0.weight"]["exp_avg"], saved[2][1]["0.weight"]["exp_avg"])


def test_log_with_late_names_and_batched_flushes(run_path: Path) -> None:
    rng = np.random.default_rng(0)
    loss = rng.normal(size=25)
    with RunWriter(run_path, model_spec=SPEC, flush_every=4) as w:
        for i in range(25):
            row = {"loss": loss[i]}
            if i >= 9:
                row["grad_norm"] = torch.tensor(2.0 * i)  # a 0-d tensor is a number too
            if i == 17:
                row["spike/ratio"] = float("nan")
            w.log(i * 3, row)
            if i == 10:
                w.write_checkpoint(i, {"w": torch.zeros(1)})
        with pytest.raises(ValueError, match="must be a number"):
            w.log(99, {"loss": "high"})
        with pytest.raises(ValueError, match="reserved"):
            w.log(99, {"step": 1})
    r = RunReader(run_path)
    assert r.log_names() == ["loss", "grad_norm", "spike/ratio"]
    log = r.log()
    np.testing.assert_array_equal(log["step"], np.arange(25) * 3)
    np.testing.assert_array_equal(log["loss"], loss)
    expected = np.where(np.arange(25) >= 9, 2.0 * np.arange(25), np.nan)
    np.testing.assert_array_equal(log["grad_norm"], expected)
    assert np.isnan(log["spike/ratio"]).all()
    assert set(r.log(["loss"])) == {"step", "loss"}
    with pytest.raises(UserError, match="no log named 'acc'; logged: loss, grad_norm, spike/ratio"):
        r.log(["acc"])
    with h5py.File(run_path, "r") as f:  # plain h5py sees aligned 1-D columns
        assert f["log/step"].shape == f["log/grad_norm"].shape == (25,)


def test_live_reading_while_a_writer_is_attached(run_path: Path) -> None:
    w = RunWriter(run_path, model_spec=SPEC)
    w.write_checkpoint(0, {"w": torch.zeros(3)})
    w.log(0, {"loss": 1.0})
    r = RunReader(run_path)
    assert r.writer_attached() and r.steps() == [0]
    assert r.log_names() == [] and r.log()["step"].size == 0  # buffered, not flushed yet
    w.flush()
    assert r.log()["loss"].tolist() == [1.0]
    w.log(1, {"loss": 0.5, "new_metric": 2.0})  # a new name: the writer leaves and re-enters SWMR
    w.write_checkpoint(5, {"w": torch.ones(3)}, buffers={"b": torch.tensor(1)})  # a new buffer too
    assert r.steps() == [0, 5] and torch.equal(r.checkpoint(5).params["w"], torch.ones(3))
    assert r.log()["new_metric"].tolist()[1] == 2.0
    # another process sees the same live file
    code = ("import sys; from lossatlas.store import RunReader; r = RunReader(sys.argv[1]); "
            "print(r.steps(), r.writer_attached(), r.checkpoint(5).buffers['b'].item())")
    out = subprocess.run([sys.executable, "-c", code, str(run_path)], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[0, 5] True 1", out.stderr
    with pytest.raises(UserError, match="another process .* is writing this run"):
        RunWriter(run_path, model_spec=SPEC, overwrite=True)
    w.close()
    assert not r.writer_attached() and r.steps() == [0, 5]


def test_sigkill_leaves_every_flushed_checkpoint(run_path: Path) -> None:
    """Kill a writer in its tight checkpoint loop; all checkpoints it reported must survive, bit for bit."""
    kill_after = 12
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, str(CHILD), str(run_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(kill_after):
            line = child.stdout.readline()
            assert line.startswith("ckpt"), child.stderr.read()
        assert child.poll() is None  # still writing: the kill lands in an active writer
        assert RunReader(run_path).writer_attached()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    reported = kill_after + len(child.stdout.read().splitlines())  # lines printed before the kill landed
    assert child.returncode == -signal.SIGKILL
    r = RunReader(run_path)
    assert not r.writer_attached()
    steps = r.steps()
    # every reported checkpoint is there; at most one more (committed but not yet reported)
    assert steps[:reported] == list(range(reported)) and len(steps) in (reported, reported + 1)
    for i in [0, 1, 2, reported - 1, *steps[reported:]]:
        ck = r.checkpoint(i)
        params, buffers = expected_state(i)
        assert all(same_bits(ck.params[k], v) for k, v in params.items()), i
        assert same_bits(ck.buffers["num_batches_tracked"], buffers["num_batches_tracked"])
        assert ck.attrs == {"epoch": i / 10}
    log = r.log()  # the log row of step i is flushed with checkpoint i
    assert log["step"].tolist() == list(range(len(log["step"]))) and len(log["step"]) >= reported
    assert np.isnan(log["late"][:2]).all() and log["late"][2] == -2.0
    with RunWriter(run_path, model_spec=SPEC, overwrite=True) as w:  # the stale lock does not block a new run
        w.write_checkpoint(0, {"w": torch.zeros(1)})
    assert RunReader(run_path).steps() == [0]


def test_reads_a_file_whose_writer_died_outside_swmr(run_path: Path) -> None:
    """A kill while the writer is outside SWMR leaves HDF5's "open for write" flag set: plain h5py
    refuses the file; RunReader reads it (flags cleared in a read-only view, superblock checksum redone)."""
    with RunWriter(run_path, model_spec=SPEC, log_names=["loss"]) as w:
        w.log(3, {"loss": 0.25})
        w.write_checkpoint(3, {"w": torch.arange(4.0)})
    code = "import h5py, sys, time; f = h5py.File(sys.argv[1], 'r+'); print('open', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code, str(run_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "open"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    before = run_path.read_bytes()
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(run_path, "r")
    r = RunReader(run_path)
    assert r.steps() == [3] and torch.equal(r.checkpoint(3).params["w"], torch.arange(4.0))
    assert r.log()["loss"].tolist() == [0.25] and file_kind(run_path) == "run"
    assert run_path.read_bytes() == before  # read-only: the file is not repaired in place


def test_refusals(tmp_path: Path, run_path: Path) -> None:
    not_hdf5 = tmp_path / "notes.h5"
    not_hdf5.write_text("hello")
    with pytest.raises(UserError, match=r"notes.h5: not an HDF5 file"):
        RunReader(not_hdf5)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    with pytest.raises(UserError, match="foreign.h5: an HDF5 file but not a lossatlas file"):
        open_run(foreign)
    with pytest.raises(UserError, match="not a lossatlas file"):
        file_kind(foreign)
    with pytest.raises(UserError, match="missing.h5: no such file"):
        RunReader(tmp_path / "missing.h5")
    with RunWriter(run_path, model_spec=SPEC) as w:
        w.write_checkpoint(0, {"w": torch.zeros(1)})
    with pytest.raises(UserError, match="already exists; pass --force"):
        RunWriter(run_path, model_spec=SPEC)
    assert RunReader(run_path).steps() == [0]  # untouched
    with h5py.File(run_path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(UserError, match=r"newer lossatlas \(format_version 2, this one reads 1\); upgrade"):
        RunReader(run_path)
    results = tmp_path / "run.results.h5"
    store = ResultsStore(results, run_fingerprint="abc")
    assert not results.exists() and store.entries() == [] and store.read("loss", "k", 0) is None  # made by a write
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("run.results")] == []  # no lock left either
    store.write(Result(probe="loss", config={}, step=0, values={"loss": np.float64(1.0)}), key="k")
    assert file_kind(results) == "results"
    with pytest.raises(UserError, match="holds results of another run"):
        ResultsStore(results, run_fingerprint="xyz")
    with pytest.raises(UserError, match="a lossatlas results file, not a run file"):
        RunReader(results)
    with pytest.raises(UserError, match="already exists"):
        RunWriter(results, model_spec=SPEC)
    with pytest.raises(UserError, match="no such results file"):
        ResultsStore(tmp_path / "none.results.h5", mode="r")
    with pytest.raises(ValueError, match="unknown mode 'w'; choose one of r, a"):
        ResultsStore(results, mode="w")


def surface_result(step: int | None, z: np.ndarray, done: np.ndarray) -> Result:
    alpha, beta = np.linspace(-1, 1, 4), np.linspace(-0.5, 0.5, 3)
    return Result(probe="surface", config={"n": np.int64(4), "norm": "filter"}, step=step,
                  values={"loss": z, "done": done, "top": np.float64(2.5), "counts": np.arange(4, dtype=np.int32),
                          "labels": np.array(["a", "bé", ""]), "beta_grid": z[:, 0]},
                  dims={"loss": ("beta", "alpha"), "done": ("beta", "alpha"), "counts": ("alpha",),
                        "labels": ("beta",), "beta_grid": ("beta",)},
                  coords={"alpha": alpha, "beta": beta}, meta={"seed": np.int32(1), "std": [0.1, float("nan")]})


def test_results_round_trip_with_dimension_scales(tmp_path: Path) -> None:
    path = tmp_path / "run.results.h5"
    z = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    done = np.zeros((3, 4), bool)
    done[0] = True
    with ResultsStore(path, run_fingerprint="fp1") as store:
        store.write(surface_result(100, z, done), key="k1", status="partial", data_fingerprint="d1", elapsed_s=1.5)
        got, info = store.read("surface", "k1", 100)
    assert info["status"] == "partial" and info["data_fingerprint"] == "d1" and info["elapsed_s"] == 1.5
    want = surface_result(100, z, done)
    assert got.values.keys() == want.values.keys() and got.coords.keys() == want.coords.keys()
    for name, arr in [*want.values.items(), *want.coords.items()]:
        stored = got.values.get(name, got.coords.get(name))
        assert stored.dtype == arr.dtype and stored.shape == arr.shape, name
        np.testing.assert_array_equal(stored, arr)
    assert got.dims == want.dims and got.config == {"n": 4, "norm": "filter"} and got.step == 100
    assert got.meta["seed"] == 1 and np.isnan(got.meta["std"][1])
    with h5py.File(path, "r") as f:  # labelled arrays for any HDF5 reader
        g = f["surface/k1/0000000100"]
        loss = g["loss"]
        assert [d.label for d in loss.dims] == ["beta", "alpha"]
        np.testing.assert_array_equal(loss.dims[1][0][:], np.linspace(-1, 1, 4))
        np.testing.assert_array_equal(loss.dims[0][0][:], np.linspace(-0.5, 0.5, 3))
        assert g["alpha"].is_scale and g["counts"].dims[0][0] == g["alpha"]  # one coord, several values
        assert len(g["labels"].dims[0]) == 1 and g["done"].dtype == np.uint8
        assert json.loads(g.attrs["dims"])["loss"] == ["beta", "alpha"] and g.attrs["status"] == "partial"


def test_results_overwrite_entries_latest_and_refusals(tmp_path: Path) -> None:
    path = tmp_path / "run.results.h5"
    z = np.ones((3, 4))
    store = ResultsStore(path, run_fingerprint="fp1")
    store.write(surface_result(5, z, np.zeros((3, 4), bool)), key="k1", status="partial")
    store.write(surface_result(5, 2 * z, np.ones((3, 4), bool)), key="k1", status="complete")  # partial -> complete
    got, info = store.read("surface", "k1", 5)
    assert info["status"] == "complete" and got.values["done"].all() and (got.values["loss"] == 2).all()
    time.sleep(0.01)
    store.write(surface_result(5, 3 * z, np.ones((3, 4), bool)), key="k2")
    store.write(surface_result(None, z, np.ones((3, 4), bool)), key="k1")
    scalar = Result(probe="hessian.top_eigs", config={"k": 2}, step=5, values={"eigenvalues": np.array([3.0, 1.0])})
    store.write(scalar, key="h1")
    entries = store.entries()
    assert {(e["probe"], e["key"], e["step"], e["status"]) for e in entries} == {
        ("hessian.top_eigs", "h1", 5, "complete"), ("surface", "k1", None, "complete"),
        ("surface", "k1", 5, "complete"), ("surface", "k2", 5, "complete")} and len(entries) == 4
    assert {e["key"] for e in store.entries("hessian.top_eigs")} == {"h1"}
    assert (store.latest("surface", 5)[0].values["loss"] == 3).all()
    assert store.latest("surface", 7) is None and store.read("surface", "k3", 5) is None
    assert store.read("surface", "k1", None)[0].step is None
    with h5py.File(path, "r") as f:
        assert list(f["surface/k1"]) == ["0000000005", "none"]  # no temporary group left behind
    with pytest.raises(UserError, match="holds results of another run .*pass another results path"):
        ResultsStore(path, run_fingerprint="fp2")
    with pytest.raises(ValueError, match="unknown status 'done'; choose one of complete, partial"):
        store.write(scalar, key="h1", status="done")
    bad = Result(probe="x", config={}, step=1, values={"v": np.zeros(3)}, dims={"v": ("a",)}, coords={"a": np.zeros(4)})
    with pytest.raises(ValueError, match="coord 'a' has shape"):
        store.write(bad, key="k")
    with pytest.raises(ValueError, match="opened read-only"):
        ResultsStore(path, mode="r").write(scalar, key="h1")


def test_opening_a_results_file_to_write_removes_dead_temporaries(tmp_path: Path) -> None:
    path = tmp_path / "run.results.h5"
    ResultsStore(path, run_fingerprint="fp").write(Result(probe="loss", config={}, step=0,
                                                          values={"loss": np.float64(1.0)}), key="k")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid is now a dead writer's
    dead = path.with_name(f".{path.name}.tmp-{child.pid}")
    live = path.with_name(f".{path.name}.tmp-{os.getppid()}")  # a live process's temporary is its own
    for temp in (dead, live):
        temp.write_bytes(b"half a file")
    ResultsStore(path, mode="r").entries()
    assert dead.exists()  # a reader never deletes
    ResultsStore(path, run_fingerprint="fp")  # a writer that then finds everything cached writes nothing
    assert not dead.exists() and live.exists()
