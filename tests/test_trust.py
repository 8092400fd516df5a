"""Factory specs read from a run file are imported only from files this user signed, or when trusted."""

import importlib
import json
import os
import stat
import sys
import threading
import uuid
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from conftest import DIGITS, TINY_MLP

from lossatlas import models, trust
from lossatlas.analysis.diagnose import checkpoint_sharpness
from lossatlas.analysis.runner import RunOptions, load_model, run_probe
from lossatlas.analysis.tracking import track_eigenspaces
from lossatlas.cli import main
from lossatlas.errors import UserError
from lossatlas.probes.loss import Loss
from lossatlas.store import RunReader, RunWriter

CKPTS = (250, 350)  # around the planted loss spike at step 300, so diagnose rebuilds the model
FAST = ["--max-examples", "64"]


@pytest.fixture
def evil(tmp_path, monkeypatch, request):
    """A module on sys.path whose import and whose factories each leave a marker file."""
    name = f"lossatlas_evil_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "mods"
    folder.mkdir()
    imported, called = tmp_path / "imported.marker", tmp_path / "called.marker"
    (folder / f"{name}.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(imported)!r}).touch()\n"
        "def model(**kwargs):\n"
        f"    pathlib.Path({str(called)!r}).touch()\n"
        "    from lossatlas import models\n"
        f"    return models.build_model({TINY_MLP!r})\n"
        "def data(**kwargs):\n"
        f"    pathlib.Path({str(called)!r}).touch()\n"
        "    from lossatlas import models\n"
        "    return models.build_data({'name': 'digits'})\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    request.addfinalizer(lambda: sys.modules.pop(name, None))
    imports: list[str] = []
    real_import = importlib.import_module

    def spy(module, *args, **kwargs):
        imports.append(module)
        return real_import(module, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", spy)
    return SimpleNamespace(name=name, model={"factory": f"{name}:model"}, data={"factory": f"{name}:data"},
                           imported=imported, called=called, imports=imports)


def untouched(evil):
    return not evil.imported.exists() and not evil.called.exists() and evil.name not in sys.modules \
        and evil.name not in evil.imports


def write_run(path, model_spec=TINY_MLP, data_spec=DIGITS):
    """A run of the tiny MLP: a 400-step log with a loss spike at 300, checkpoints at 250 and 350."""
    net = models.build_model(TINY_MLP)
    rng = np.random.default_rng(0)
    loss = 2.0 * np.exp(0.01 * rng.standard_normal(400))
    loss[299:305] *= 3.0 ** (1 - np.arange(6) / 6)
    with RunWriter(path, model_spec=model_spec, data_spec=data_spec, loss="cross_entropy") as w:
        for step in range(1, 401):
            w.log(step, {"loss": float(loss[step - 1]), "lr": 0.05})
            if step in CKPTS:
                w.write_checkpoint(step, dict(net.named_parameters()), dict(net.named_buffers()))
    return path


def set_attr(path, name, value):
    with h5py.File(path, "r+") as f:
        if value is None:
            del f.attrs[name]
        else:
            f.attrs[name] = value


def crafted(tmp_path, model_spec=None, data_spec=None):
    """A run file someone else made: specs written into the attrs, no signature of this user."""
    path = write_run(tmp_path / "shared.h5")
    for role, spec in (("model", model_spec), ("data", data_spec)):
        if spec is not None:
            set_attr(path, role, json.dumps(spec))
    return path


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


ENTRY_POINTS = {
    "probe": ["loss", "RUN", *FAST],
    "track": ["track", "RUN", "--steps", "last", "--top-k", "1", *FAST],
    "diagnose": ["diagnose", "RUN"],
}


@pytest.mark.parametrize("role", ["model", "data"])
@pytest.mark.parametrize("command", list(ENTRY_POINTS))
def test_cli_refuses_an_untrusted_factory_before_importing_it(tmp_path, capsys, evil, command, role):
    path = crafted(tmp_path, **{f"{role}_spec": getattr(evil, role)})
    code, out, err = cli(capsys, *[path if a == "RUN" else a for a in ENTRY_POINTS[command]])
    line = one_line(err)
    assert code == 2 and out == ""
    assert f"'{evil.name}:{role}'" in line and "--trust-factory" in line and f"--{role}" in line
    assert line.startswith(f"lossatlas: error: {path}: the stored {role} spec")
    assert untouched(evil)
    assert not (tmp_path / "shared.results.h5").exists()  # refused before any work


@pytest.mark.parametrize("command", list(ENTRY_POINTS))
def test_os_system_in_a_shared_file_runs_nothing(tmp_path, capsys, command, monkeypatch):
    marker = tmp_path / "pwned"
    path = crafted(tmp_path, model_spec={"factory": "os:system", "kwargs": {"command": f"touch {marker}"}})
    imports = []
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda m, *a: imports.append(m) or real_import(m, *a))
    argv = [path if a == "RUN" else a for a in ENTRY_POINTS[command]]
    code, _, err = cli(capsys, *argv)
    assert code == 2 and "'os:system'" in one_line(err) and "--trust-factory" in one_line(err)
    assert not marker.exists() and "os" not in imports
    # the flag is all that stood in the way: trusted, the command runs (then os.system returns no Module)
    code, _, err = cli(capsys, *argv, "--trust-factory")
    assert code == 2 and marker.exists() and "must return a torch.nn.Module" in one_line(err)


def test_python_api_refuses_an_untrusted_factory(tmp_path, evil):
    path = crafted(tmp_path, model_spec=evil.model, data_spec=evil.data)
    calls = [
        lambda: run_probe(path, Loss(), RunOptions(max_examples=64)),
        lambda: run_probe(path, Loss(), RunOptions(max_examples=64, data=DIGITS)),  # model still refused
        lambda: track_eigenspaces(path, steps="last", k=1, max_examples=64),
        lambda: checkpoint_sharpness(path),
        lambda: load_model(RunReader(path), CKPTS[0]),
        lambda: models.build_model(RunReader(path).model_spec),
        lambda: models.build_data(RunReader(path).data_spec),
    ]
    for call in calls:
        with pytest.raises(UserError, match="--trust-factory") as info:
            call()
        assert evil.name in str(info.value) and "\n" not in str(info.value)
    assert untouched(evil)


def test_trust_factory_runs_the_same_file(tmp_path, capsys, evil):
    path = crafted(tmp_path, model_spec=evil.model, data_spec=evil.data)
    code, out, err = cli(capsys, "loss", path, "--trust-factory", *FAST)
    assert code == 0 and "step 350" in out, err
    assert evil.imported.exists() and evil.called.exists()
    evil.called.unlink()
    code, _, err = cli(capsys, "diagnose", path, "--trust-factory", "--json")
    assert code == 0, err
    assert evil.called.exists()  # λ_max around the spike rebuilt the model
    res = track_eigenspaces(path, steps="all", k=1, max_examples=64, trust_factory=True)
    assert res.values["top_eigenvalues"].shape == (2, 1)
    report = run_probe(path, Loss(), RunOptions(max_examples=64, trust_factory=True, force=True))
    assert report.outcomes[0].result.scalar("loss") > 0


def test_specs_passed_again_are_trusted(tmp_path, capsys, evil):
    path = crafted(tmp_path, model_spec=evil.model, data_spec=evil.data)
    again = ["--model", json.dumps(TINY_MLP), "--data", "digits"]
    code, out, err = cli(capsys, "loss", path, *again, *FAST)
    assert code == 0 and "step 350" in out, err
    code, _, err = cli(capsys, "track", path, "--top-k", "1", *again, *FAST)
    assert code == 0, err
    code, _, err = cli(capsys, "diagnose", path, *again)
    assert code == 0, err
    code, _, err = cli(capsys, "loss", path, "--model", json.dumps(TINY_MLP), *FAST)  # the data spec still refused
    assert code == 2 and "the stored data spec" in one_line(err) and "--data" in one_line(err)
    assert untouched(evil)


def test_own_file_needs_no_flag_and_other_keys_do_not_trust_it(tmp_path, capsys, evil, monkeypatch):
    monkeypatch.setenv("LOSSATLAS_CONFIG_DIR", str(tmp_path / "me"))
    path = write_run(tmp_path / "mine.h5", model_spec=evil.model, data_spec=evil.data)
    key = tmp_path / "me" / "signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert len(key.read_bytes()) == 32
    with RunReader(path) as r:
        assert r.model_spec.signed and r.data_spec.signed and r.model_spec == evil.model
    code, out, err = cli(capsys, "loss", path, *FAST)
    assert code == 0 and "step 350" in out, err
    assert evil.called.exists()

    evil.called.unlink()
    monkeypatch.setenv("LOSSATLAS_CONFIG_DIR", str(tmp_path / "someone_else"))
    write_run(tmp_path / "theirs.h5", model_spec=evil.model)  # gives the other user a key of their own
    assert (tmp_path / "someone_else" / "signing.key").read_bytes() != key.read_bytes()
    with RunReader(path) as r:
        assert not r.model_spec.signed
    code, _, err = cli(capsys, "loss", path, "--force", *FAST)
    assert code == 2 and "--trust-factory" in one_line(err)
    assert not evil.called.exists()

    monkeypatch.setenv("LOSSATLAS_CONFIG_DIR", str(tmp_path / "me"))
    key.unlink()  # revokes every signature made with it
    code, _, err = cli(capsys, "loss", path, "--force", *FAST)
    assert code == 2 and "--trust-factory" in one_line(err)
    assert not evil.called.exists()


@pytest.mark.parametrize("edit", ["kwargs", "factory", "swap_roles", "no_signatures", "double_encoded"])
def test_edited_specs_lose_the_signature(tmp_path, evil, edit):
    path = write_run(tmp_path / "mine.h5", model_spec=evil.model, data_spec=evil.data)
    with RunReader(path) as r:
        assert r.model_spec.signed and r.data_spec.signed
    sigs = json.loads(h5py.File(path, "r").attrs["spec_signatures"])
    if edit == "kwargs":
        set_attr(path, "model", json.dumps({**evil.model, "kwargs": {"width": 3}}))
    elif edit == "factory":
        set_attr(path, "model", json.dumps({"factory": "os:system", "kwargs": {"command": "true"}}))
    elif edit == "swap_roles":  # a data signature does not vouch for the same text as a model spec
        set_attr(path, "model", json.dumps(evil.data))
        set_attr(path, "spec_signatures", json.dumps({"model": sigs["data"], "data": sigs["data"]}))
    elif edit == "no_signatures":  # also what a file from before signatures looks like
        set_attr(path, "spec_signatures", None)
    else:  # a factory hidden in a JSON string inside the JSON attr
        set_attr(path, "model", json.dumps(json.dumps({"factory": "os:system", "kwargs": {"command": "true"}})))
    with RunReader(path) as r:
        assert not r.model_spec.signed and "factory" in r.model_spec
        with pytest.raises(UserError, match="the stored model spec names the factory"):
            load_model(r, CKPTS[0])
    assert untouched(evil)


def test_registered_names_never_need_trust(tmp_path, capsys, monkeypatch):
    path = write_run(tmp_path / "names.h5")
    assert json.loads(h5py.File(path, "r").attrs["spec_signatures"]) == {}  # nothing to sign
    set_attr(path, "spec_signatures", None)  # a file from before signatures
    monkeypatch.setenv("LOSSATLAS_CONFIG_DIR", str(tmp_path / "stranger"))
    code, out, err = cli(capsys, "loss", path, *FAST)
    assert code == 0 and "step 350" in out, err
    assert not (tmp_path / "stranger").exists()  # reading made no key
    code, _, err = cli(capsys, "diagnose", path)
    assert code == 0, err


def test_a_spec_the_caller_writes_is_trusted(evil):
    model = models.build_model(evil.model)
    assert evil.called.exists() and sum(p.numel() for p in model.parameters()) > 0


def test_unsafe_key_files_are_not_used(tmp_path, capsys, evil, monkeypatch):
    monkeypatch.setenv("LOSSATLAS_CONFIG_DIR", str(tmp_path / "me"))
    path = write_run(tmp_path / "mine.h5", model_spec=evil.model)
    key = tmp_path / "me" / "signing.key"
    key.chmod(0o666)
    code, _, err = cli(capsys, "loss", path, *FAST)
    line = one_line(err)
    assert code == 2 and str(key) in line and "chmod 600" in line and "--trust-factory" in line
    with pytest.warns(UserWarning, match="unsigned"):
        write_run(tmp_path / "new.h5", model_spec=evil.model)
    key.chmod(0o600)
    with RunReader(path) as r:
        assert r.model_spec.signed
        real_uid = os.geteuid()
        monkeypatch.setattr(trust.os, "geteuid", lambda: real_uid + 1)  # the key now belongs to someone else
        assert not r.model_spec.signed
        with pytest.raises(UserError, match="not by you"):
            load_model(r, CKPTS[0])
    assert untouched(evil)


def test_concurrent_first_use_makes_one_key(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSATLAS_CONFIG_DIR", str(tmp_path / "fresh" / "cfg"))
    keys, barrier = [], threading.Barrier(8)

    def make():
        barrier.wait()
        keys.append(trust.signing_key(create=True))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8 and len(set(keys)) == 1 and len(keys[0]) == 32
    assert sorted(os.listdir(tmp_path / "fresh" / "cfg")) == ["signing.key"]  # no temporary files left
