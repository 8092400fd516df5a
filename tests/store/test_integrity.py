"""Data integrity of the run and results files (lossatlas/store/): checksums that catch truncated or
corrupted checkpoints and results, copy-on-write results writes that survive a full disk, atomic creation
that survives SIGKILL, and outputs that never overwrite their inputs."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import DIGITS

from lossatlas import models
from lossatlas.cli import main
from lossatlas.errors import UserError
from lossatlas.importer import import_checkpoints
from lossatlas.probes.base import Result
from lossatlas.store import ResultsStore, RunReader, RunWriter, default_results_path

MODEL = {"name": "mlp", "kwargs": {"widths": [64, 96, 10]}}  # 7210 parameters: tensor chunks fill most of the file
STEPS = [0, 5, 10, 15, 20, 25]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def states(step: int) -> dict[str, torch.Tensor]:
    """The model's state at ``step``: a seeded initialisation, so that every step differs."""
    torch.manual_seed(step)
    return models.build_model(MODEL).state_dict()


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run of six checkpoints of a small MLP on digits, each with Adam-like optimizer state."""
    path = tmp_path / "run.h5"
    with RunWriter(path, model_spec=MODEL, data_spec=DIGITS, loss="cross_entropy") as w:
        for s in STEPS:
            params = states(s)
            opt = {k: {"exp_avg": v * 0.5, "step": torch.tensor(float(s))} for k, v in params.items()}
            w.write_checkpoint(s, params, optimizer_state=opt, attrs={"lr": 0.1})
    return path


def chunk_ends(path: Path) -> dict[int, dict[str, int]]:
    """For each checkpoint step, the end offset in the file of each of its tensor rows' chunks."""
    out: dict[int, dict[str, int]] = {}
    with h5py.File(path, "r") as f:
        steps = f["checkpoints/step"][:].tolist()

        def visit(name: str, ds) -> None:
            if isinstance(ds, h5py.Dataset) and "torch_dtype" in ds.attrs:
                what = name.removeprefix("params/").removeprefix("buffers/")
                for row, step in enumerate(steps):
                    info = ds.id.get_chunk_info_by_coord((row,) + (0,) * (ds.ndim - 1))
                    out.setdefault(step, {})[what] = info.byte_offset + info.size

        f["checkpoints"].visititems(visit)
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


# -- A: checkpoints ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_run_names_the_damaged_checkpoints(run: Path, fraction: float, capsys) -> None:
    ends = chunk_ends(run)
    size = run.stat().st_size
    cut = int(size * fraction)
    intact = {s: dict(states(s)) for s in STEPS}
    with open(run, "r+b") as fh:
        fh.truncate(cut)
    cut_off = [s for s in STEPS if max(ends[s].values()) > cut]  # a chunk of theirs lies past the cut
    assert cut_off, "the cut must reach some tensor data"

    reader = RunReader(run, damaged_ok=True)
    assert reader.truncated == (cut, size)
    checks = reader.verify()
    assert list(checks) == STEPS
    for s in cut_off:
        assert checks[s].startswith("damaged: "), (s, checks[s])
    for s in STEPS:
        if checks[s] == "ok":  # what is called intact is bit for bit the checkpoint that was written
            params = reader.checkpoint(s).params
            assert all(same_bits(params[k], v) for k, v in intact[s].items())
    with pytest.raises(UserError, match="the file is truncated .* its log cannot be trusted"):
        reader.log()
    # the damaged tail: the first checkpoint from which on every one is damaged
    tail = min(s for s in STEPS if all(checks[t] != "ok" for t in STEPS if t >= s))
    name = checks[tail].removeprefix("damaged: ")
    message = (rf"run.h5: the file is truncated \({cut} of {size} bytes\): checkpoint at step {tail} is damaged "
               rf"\(tensor '{re.escape(name)}' (fails its checksum|cannot be read[^)]*)\), and every later one; "
               r"restore it from a copy")
    with pytest.raises(UserError, match=message):
        RunReader(run)

    for argv in (["loss", run, "--steps", "all"], ["loss", run, "--steps", "0"], ["diagnose", run, "--no-curvature"],
                 ["info", run]):
        code, out, err = run_cli(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, (argv, err)
        assert re.search(message, err), (argv, err)
    assert not default_results_path(run).exists()

    code, out, err = run_cli(["info", run, "--verify"], capsys)
    assert code == 2 and f"the file is truncated ({cut} of {size} bytes)" in err
    for s in STEPS:
        assert re.search(rf"step {s}\s+{re.escape(checks[s])}$", out, re.M), out
    assert f"{sum(v == 'ok' for v in checks.values())} of {len(STEPS)} checkpoints intact" in out


def test_flipped_byte_in_a_tensor_chunk(run: Path, capsys) -> None:
    name, step = max(states(0).items(), key=lambda kv: kv[1].numel())[0], 10
    with h5py.File(run, "r") as f:
        ds = f[f"checkpoints/params/{name}"]
        info = ds.id.get_chunk_info_by_coord((STEPS.index(step),) + (0,) * (ds.ndim - 1))
    with open(run, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0x04]))

    assert RunReader(run).verify() == {s: f"damaged: {name}" if s == step else "ok" for s in STEPS}
    with pytest.raises(UserError, match=rf"run.h5: checkpoint at step 10 is damaged \(tensor '{re.escape(name)}' "
                                        r"fails its checksum\); the file was truncated or corrupted"):
        RunReader(run).checkpoint(step)
    assert same_bits(RunReader(run).checkpoint(5).params[name], states(5)[name])

    code, out, err = run_cli(["loss", run, "--steps", "all"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"checkpoint at step 10 is damaged (tensor '{name}' fails its checksum)" in err
    code, out, err = run_cli(["loss", run, "--steps", "0,5,15"], capsys)  # the intact ones still work
    assert code == 0, err

    code, out, err = run_cli(["info", run, "--verify", "--json"], capsys)
    import json

    data = json.loads(out)
    assert code == 2 and data["verify"]["checkpoints"]["10"] == f"damaged: {name}"
    assert [v for k, v in data["verify"]["checkpoints"].items() if k != "10"] == ["ok"] * 5
    assert all(e["status"] == "ok" for e in data["verify"]["results"]) and len(data["verify"]["results"]) == 3


def test_damaged_optimizer_state_is_named(run: Path) -> None:
    with h5py.File(run, "r") as f:
        name = next(iter(f["checkpoints/optimizer"]))
        ds = f[f"checkpoints/optimizer/{name}/exp_avg"]
        info = ds.id.get_chunk_info_by_coord((1,) + (0,) * (ds.ndim - 1))
    with open(run, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\x00\x01\x02\x03")
    checks = RunReader(run).verify()
    assert checks[5] == f"damaged: optimizer/{name}/exp_avg" and sum(v == "ok" for v in checks.values()) == 5
    RunReader(run).checkpoint(5)  # the parameters alone are intact
    with pytest.raises(UserError, match=rf"step 5 is damaged \(tensor 'optimizer/{re.escape(name)}/exp_avg'"):
        RunReader(run).checkpoint(5, optimizer_state=True)


def test_file_without_checksums_reads_as_before(run: Path, capsys) -> None:
    """A run written before checksums existed: no digest dataset, no ``checksums`` attribute."""
    with h5py.File(run, "r+") as f:
        del f["checkpoints/digest"]
        del f.attrs["checksums"]
    r = RunReader(run)
    name = next(iter(states(0)))
    assert same_bits(r.checkpoint(15).params[name], states(15)[name])
    assert set(r.verify().values()) == {"unverified (no checksums)"}
    code, out, err = run_cli(["info", run, "--verify"], capsys)
    assert code == 0 and "0 of 6 checkpoints intact" in out and "unverified (no checksums)" in out


def test_checksums_cost_little(tmp_path: Path) -> None:
    """The checksums of a 26k-parameter model's checkpoint (with Adam state) take well under a millisecond
    each way next to what HDF5 spends writing it."""
    from lossatlas.store.integrity import digest

    model = models.build_model({"name": "mlp", "kwargs": {"widths": [64, 128, 128, 10]}})
    params = {k: v.detach() for k, v in model.state_dict().items()}
    assert 25_000 < sum(v.numel() for v in params.values()) < 27_000
    arrays = [v.numpy() for v in params.values()] * 3  # params, exp_avg, exp_avg_sq
    t = time.process_time()
    for _ in range(20):
        for a in arrays:
            digest(a)
    per_checkpoint = (time.process_time() - t) / 20
    opt = {k: {"exp_avg": v.clone(), "exp_avg_sq": v.clone()} for k, v in params.items()}
    with RunWriter(tmp_path / "cost.h5", model_spec=None) as w:
        t = time.process_time()
        for s in range(10):
            w.write_checkpoint(s, params, optimizer_state=opt)
        write = (time.process_time() - t) / 10
    assert per_checkpoint < 0.2 * write, (per_checkpoint, write)


# -- A: results --------------------------------------------------------------------------------------------------
def results_with(tmp_path: Path, n: int = 3) -> Path:
    path = tmp_path / "r.results.h5"
    store = ResultsStore(path, run_fingerprint="fp")
    for s in range(n):
        store.write(Result(probe="loss", config={}, step=s, values={"loss": np.full(64, float(s)),
                                                                    "labels": np.array(["a", "b"])}), key="k1")
    return path


def test_damaged_result_is_refused_naming_the_entry(tmp_path: Path, capsys) -> None:
    path = results_with(tmp_path)
    with h5py.File(path, "r") as f:
        offset = f["loss/k1/0000000001/loss"].id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(offset + 8)
        fh.write(b"\x7f")
    store = ResultsStore(path, mode="r")
    assert store.read("loss", "k1", 0)[0].values["loss"][0] == 0.0
    with pytest.raises(UserError, match=r"r.results.h5: result loss/k1 at step 1 is damaged \(dataset 'loss' fails "
                                        r"its checksum\); .*--force"):
        store.read("loss", "k1", 1)
    assert [e["status"] for e in store.verify()] == ["ok", "damaged: dataset 'loss' fails its checksum", "ok"]
    code, out, err = run_cli(["info", path, "--verify"], capsys)
    assert code == 2 and "2 of 3 entries intact" in out and "1 of 3 results are damaged" in err
    # rewriting the damaged entry repairs it
    ResultsStore(path).write(Result(probe="loss", config={}, step=1, values={"loss": np.ones(2)}), key="k1")
    assert [e["status"] for e in ResultsStore(path, mode="r").verify()] == ["ok"] * 3


def test_info_verify_checks_the_runs_results_file(run: Path, capsys) -> None:
    assert run_cli(["loss", run, "--steps", "0,5"], capsys)[0] == 0
    results = default_results_path(run)
    with h5py.File(results, "r") as f:
        entry = next(iter(f["loss"].values()))["0000000005"]
        name = next(n for n, ds in entry.items() if ds.id.get_offset() is not None and ds.dtype.kind == "f")
        offset = entry[name].id.get_offset()
    with open(results, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\xff\xff")
    code, out, err = run_cli(["info", run, "--verify"], capsys)
    assert code == 2 and "6 of 6 checkpoints intact" in out and "1 of 2 entries intact" in out
    assert re.search(rf"loss/\w+ step 5\s+damaged: dataset '{name}' fails its checksum", out)
    code, out, err = run_cli(["loss", run, "--steps", "5"], capsys)  # the cached lookup meets the damage
    assert code == 2 and re.search(r"result loss/\w+ at step 5 is damaged", err)
    assert run_cli(["loss", run, "--steps", "5", "--force"], capsys)[0] == 0  # recomputing replaces it
    assert run_cli(["info", run, "--verify"], capsys)[0] == 0


# -- B: a full disk ----------------------------------------------------------------------------------------------
def snapshot(path: Path) -> tuple[bytes, list[str]]:
    return path.read_bytes(), sorted(os.listdir(path.parent))


@pytest.mark.parametrize("where", ["fsync", "hdf5"])
def test_disk_full_during_a_results_write_keeps_every_result(run: Path, where: str, capsys, monkeypatch) -> None:
    assert run_cli(["loss", run, "--steps", "0,5"], capsys)[0] == 0
    results = default_results_path(run)
    before = snapshot(results)

    def no_space(*args, **kwargs):
        if where == "fsync":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise OSError("Unable to create group (file write failed: errno = 28, error message = "
                      "'No space left on device')")

    if where == "fsync":
        monkeypatch.setattr(os, "fsync", no_space)
    else:
        monkeypatch.setattr(h5py.Group, "create_group", no_space)
    code, out, err = run_cli(["loss", run, "--steps", "10"], capsys)
    monkeypatch.undo()
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert re.search(r"run.results.h5: the disk is full \(.* free\); free some space and rerun the same command "
                     "to resume", err)
    assert snapshot(results) == before  # byte for byte, and no temporary left beside it
    assert {e["step"] for e in ResultsStore(results, mode="r").entries()} == {0, 5}
    assert run_cli(["loss", run, "--steps", "0,5,10"], capsys)[0] == 0  # space is back: the rerun resumes
    assert {e["step"] for e in ResultsStore(results, mode="r").entries()} == {0, 5, 10}


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 3 MiB tmpfs (needs root and mount)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full disk needs root to mount a small tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(directory: Path, leave: int) -> None:
    """Fill the file system of ``directory`` until ``leave`` bytes are free."""
    free = shutil.disk_usage(directory).free
    with open(directory / "filler", "wb") as fh:
        try:
            fh.write(b"\0" * max(0, free - leave))
        except OSError:
            pass


def test_a_real_full_disk(small_disk: Path, capsys) -> None:
    path = small_disk / "r.results.h5"
    store = ResultsStore(path, run_fingerprint="fp")
    for s in range(4):
        store.write(Result(probe="p", config={}, step=s, values={"v": np.full(1000, float(s))}), key="k")
    before = snapshot(path)
    fill(small_disk, leave=100_000)
    big = Result(probe="p", config={}, step=9, values={"v": np.zeros(200_000)})  # 1.6 MB: cannot fit
    with pytest.raises(UserError, match=r"r.results.h5: the disk is full \(.* free\); free some space and rerun"):
        store.write(big, key="k")
    assert snapshot(path) == (before[0], sorted([*before[1], "filler"]))
    for s in range(4):
        assert (store.read("p", "k", s)[0].values["v"] == s).all()
    (small_disk / "filler").unlink()
    store.write(big, key="k")
    assert len(store.entries()) == 5

    # a run written onto a full disk stops with the same one line, its checkpoints intact
    fill(small_disk, leave=1_400_000)
    with pytest.raises(UserError, match=r"run.h5: the disk is full .*the checkpoints written so far are intact"):
        with RunWriter(small_disk / "run.h5", model_spec=MODEL) as w:
            for s in range(100):
                w.write_checkpoint(s, {"w": torch.full((256, 256), float(s))})
    steps = RunReader(small_disk / "run.h5").steps()
    assert steps and set(RunReader(small_disk / "run.h5").verify().values()) == {"ok"}


# -- B: several writers ------------------------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, numpy as np
    from lossatlas.store import ResultsStore
    from lossatlas.probes.base import Result
    store = ResultsStore(sys.argv[1], run_fingerprint="fp")
    print("ready", flush=True)
    sys.stdin.readline()
    for s in range(int(sys.argv[3])):
        store.write(Result(probe="p", config={}, step=s, values={"v": np.full(500, s)}), key=sys.argv[2])
        print("wrote", s, flush=True)
""")


def test_concurrent_writers_all_land(tmp_path: Path) -> None:
    path = tmp_path / "r.results.h5"
    children = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), key, "12"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=ENV) for key in ("a", "b")]
    for c in children:
        assert c.stdout.readline().strip() == "ready"
    for c in children:
        c.stdin.write("go\n")
        c.stdin.flush()
    for c in children:
        c.communicate(timeout=120)
        assert c.returncode == 0
    store = ResultsStore(path, mode="r")
    assert sorted((e["key"], e["step"]) for e in store.entries()) == [(k, s) for k in "ab" for s in range(12)]
    assert all(e["status"] == "ok" for e in store.verify())
    assert sorted(os.listdir(tmp_path)) == ["r.results.h5"]  # no temporary, no lock sidecar left


# -- C: kills at creation ------------------------------------------------------------------------------------------
KILL_AT_PUBLISH = textwrap.dedent("""
    import os, signal, sys
    import lossatlas.store.integrity as integrity
    calls, original = [0], integrity.publish
    def publish(tmp, path, *, overwrite):
        calls[0] += 1
        if calls[0] == int(sys.argv[2]):
            print("temp", tmp, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(tmp, path, overwrite=overwrite)
    integrity.publish = publish
    from lossatlas.cli import main
    sys.exit(main(["loss", sys.argv[1], "--steps", "all"]))
""")


@pytest.mark.parametrize("kill_at", [1, 3], ids=["creation", "third-write"])
def test_sigkill_while_writing_results_then_rerun_resumes(run: Path, kill_at: int, capsys) -> None:
    """Publish 1 creates the results file, each later one writes an entry; the kill lands just before it."""
    done = subprocess.run([sys.executable, "-c", KILL_AT_PUBLISH, str(run), str(kill_at)], capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    temp = Path(done.stdout.split("temp", 1)[1].strip())
    assert temp.exists() and temp.parent == run.parent  # the kill landed with the temporary written
    results = default_results_path(run)
    if kill_at == 1:
        assert not results.exists()  # no stub
    else:
        assert [e["step"] for e in ResultsStore(results, mode="r").entries()] == [0]
    code, out, err = run_cli(["loss", run, "--steps", "all"], capsys)
    assert code == 0, err
    assert sorted(e["step"] for e in ResultsStore(results, mode="r").entries()) == STEPS
    assert not temp.exists()  # the dead writer's temporary is cleaned up


def test_sigkill_at_random_moments_never_leaves_a_stub(tmp_path: Path) -> None:
    path = tmp_path / "r.results.h5"
    for i, delay in enumerate([0.0, 0.002, 0.01, 0.03]):
        c = subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"k{i}", "1000"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=ENV)
        assert c.stdout.readline().strip() == "ready"
        c.stdin.write("go\n")
        c.stdin.flush()
        time.sleep(delay)
        c.kill()
        c.wait(timeout=30)
        reported = [line for line in c.stdout.read().splitlines() if line.startswith("wrote")]
        store = ResultsStore(path, run_fingerprint="fp")  # opens: never a stub
        got = {(e["key"], e["step"]) for e in store.entries()}
        assert {(f"k{i}", int(line.split()[1])) for line in reported} <= got
        assert all(e["status"] == "ok" for e in store.verify())
    store.write(Result(probe="p", config={}, step=0, values={"v": np.zeros(1)}), key="after")
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_sigkill_while_creating_a_run_file(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import os, signal, sys, torch
        import lossatlas.store as store
        import lossatlas.store.integrity as integrity
        def publish(tmp, path, *, overwrite):
            print("temp", tmp, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        integrity.publish = publish
        store.RunWriter(sys.argv[1], model_spec={"name": "mlp"})
    """)
    path = tmp_path / "run.h5"
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    temp = Path(done.stdout.split("temp", 1)[1].strip())
    assert temp.exists() and not path.exists()
    with RunWriter(path, model_spec=MODEL) as w:  # no --force needed: nothing was left at the path
        w.write_checkpoint(0, states(0))
    assert RunReader(path).verify() == {0: "ok"} and not temp.exists()


def test_stub_results_file_is_refused_not_overwritten(run: Path, capsys) -> None:
    """An older lossatlas killed at creation left a 96-byte HDF5 stub."""
    results = default_results_path(run)
    code = "import h5py, os, sys; f = h5py.File(sys.argv[1], 'w-'); os.kill(os.getpid(), 9)"
    subprocess.run([sys.executable, "-c", code, str(results)], env=ENV, timeout=60)
    stub = results.read_bytes()
    assert 0 < len(stub) < 1000
    code, out, err = run_cli(["loss", run, "--steps", "0"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "exists but is not a readable results file" in err and f"mv {results} {results}.broken" in err
    assert results.read_bytes() == stub
    results.rename(results.with_name("aside.h5"))
    assert run_cli(["loss", run, "--steps", "0"], capsys)[0] == 0


# -- D: outputs never overwrite inputs ---------------------------------------------------------------------------
def test_import_onto_an_input_is_refused(tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "ckpt_100.pt"
    torch.save(states(100), ckpt)
    before = ckpt.read_bytes()
    for output, force in ((ckpt, True), (ckpt, False), (tmp_path / "link.pt", True)):
        if output.name == "link.pt":
            output.symlink_to(ckpt)
        code, out, err = run_cli(["import", ckpt, "-o", output, "--model", '{"name": "mlp", "kwargs": '
                                  '{"widths": [64, 96, 10]}}', *(["--force"] if force else [])], capsys)
        assert code == 2 and "the output is also an input checkpoint" in err, err
        assert ckpt.read_bytes() == before


def test_import_force_replaces_only_when_complete(tmp_path: Path) -> None:
    good, bad = tmp_path / "ckpt_1.pt", tmp_path / "ckpt_2.pt"
    torch.save(states(1), good)
    torch.save({k: v[..., :1] for k, v in states(2).items()}, bad)  # wrong shapes: refused mid-import
    out = tmp_path / "run.h5"
    import_checkpoints([good], out, model_spec=MODEL)
    before = out.read_bytes()
    with pytest.raises(UserError, match="shape mismatch"):
        import_checkpoints([good, bad], out, model_spec=MODEL, overwrite=True)
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["ckpt_1.pt", "ckpt_2.pt", "run.h5"]
    import_checkpoints([good], out, model_spec=MODEL, overwrite=True, step_pattern=r"_(\d+)")
    assert RunReader(out).steps() == [1]


def test_report_and_plot_onto_their_inputs_are_refused(run: Path, capsys) -> None:
    assert run_cli(["loss", run, "--steps", "0"], capsys)[0] == 0
    results = default_results_path(run)
    before = run.read_bytes(), results.read_bytes()
    for argv in (["report", run, "-o", run, "--force"], ["plot", run, "loss", "-o", run, "--force"]):
        code, out, err = run_cli(argv, capsys)
        assert code == 2 and "that is the run file this command reads" in err, err
    html = run.with_name("r.html")
    results.rename(html)
    code, out, err = run_cli(["report", run, "-o", html, "--results", html, "--force"], capsys)
    assert code == 2 and "that is the results file this command reads" in err, err
    html.rename(results)
    assert (run.read_bytes(), results.read_bytes()) == before
