from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from lossatlas.analysis.runner import RunOptions, default_results_path, run_probe
from lossatlas.probes.base import PROBES, Probe, ProbeContext, Result, register_probe
from lossatlas.probes.loss import Loss, evaluate_loss
from lossatlas.store import ResultsStore


class Interrupt(Exception):
    pass


@dataclass(frozen=True, kw_only=True)
class CountingProbe(Probe):
    """Test probe: computes i² for i < n one item at a time, saving a partial result after each."""

    name: ClassVar[str] = "test.counting"
    n: int = 6

    def run(self, ctx: ProbeContext) -> Result:
        done = np.zeros(self.n, bool)
        vals = np.zeros(self.n)
        if ctx.partial is not None:
            done = ctx.partial.values["done"].astype(bool).copy()
            vals = ctx.partial.values["vals"].copy()
        for i in range(self.n):
            if done[i]:
                continue
            vals[i], done[i] = float(i * i), True
            ctx.save_partial(Result(self.name, self.config(), ctx.step, {"vals": vals.copy(), "done": done.copy()}))
        return Result(self.name, self.config(), ctx.step, {"vals": vals, "done": done},
                      meta={"resumed": ctx.partial is not None})


@pytest.fixture(autouse=True)
def counting_probe_registered():
    """Register the test probe for this module's tests only, so that it never leaks into the CLI of others."""
    register_probe(CountingProbe)
    yield
    PROBES.pop(CountingProbe.name, None)


def test_loss_probe_caches_and_recomputes(tiny_run):
    probe = Loss()
    first = run_probe(tiny_run, probe, RunOptions(steps="all"))
    assert [o.status for o in first.outcomes] == ["computed"] * 5
    assert first.results_path == default_results_path(tiny_run)
    again = run_probe(tiny_run, probe, RunOptions(steps="all"))
    assert [o.status for o in again.outcomes] == ["cached"] * 5
    for a, b in zip(first.results, again.results):
        assert a.scalar("loss") == b.scalar("loss")
    forced = run_probe(tiny_run, probe, RunOptions(steps="last", force=True))
    assert [o.status for o in forced.outcomes] == ["computed"]
    other_data = run_probe(tiny_run, probe, RunOptions(steps="last", max_examples=100))
    assert [o.status for o in other_data.outcomes] == ["recomputed"]
    other_cfg = run_probe(tiny_run, Loss(mode="train"), RunOptions(steps="last"))
    assert other_cfg.key != first.key and other_cfg.outcomes[0].status == "computed"
    with ResultsStore(first.results_path, mode="r") as store:
        entries = store.entries("loss")
    assert len({e["key"] for e in entries}) == 2


def test_loss_value_matches_direct_evaluation(tiny_run):
    from lossatlas import store
    from lossatlas.analysis.runner import load_batches, load_model

    report = run_probe(tiny_run, Loss(), RunOptions(steps="last", batch_size=100))
    with store.RunReader(tiny_run) as r:
        model = load_model(r, r.steps()[-1])
        batches = load_batches(r.data_spec, batch_size=None)
    loss, acc, _ = evaluate_loss(model, batches, "cross_entropy")
    assert report.results[0].scalar("loss") == pytest.approx(loss, rel=1e-6)
    assert report.results[0].scalar("accuracy") == pytest.approx(acc, abs=1e-12)


def test_partial_result_resumes_same_config(tiny_run, monkeypatch):
    probe = CountingProbe(n=6)
    calls = {"n": 0}
    original = CountingProbe.run

    def interrupted(self, ctx):
        real_save = ctx.save_partial

        def save(res):
            real_save(res)
            calls["n"] += 1
            if calls["n"] == 3:
                raise Interrupt

        ctx.save_partial = save
        return original(self, ctx)

    monkeypatch.setattr(CountingProbe, "run", interrupted)
    with pytest.raises(Interrupt):
        run_probe(tiny_run, probe, RunOptions(steps="last"))
    monkeypatch.setattr(CountingProbe, "run", original)
    report = run_probe(tiny_run, probe, RunOptions(steps="last"))
    out = report.outcomes[0]
    assert out.status == "resumed" and out.result.meta["resumed"] is True
    np.testing.assert_array_equal(out.result.values["vals"], np.arange(6.0) ** 2)


def test_a_refused_run_leaves_no_results_file(tiny_run):
    import h5py

    from lossatlas.errors import UserError

    with pytest.raises(UserError, match="unknown model 'nonexistent'"):
        run_probe(tiny_run, Loss(), RunOptions(steps="last", model={"name": "nonexistent"}))
    nospec = tiny_run.with_name("nospec.h5")
    nospec.write_bytes(tiny_run.read_bytes())
    with h5py.File(nospec, "r+") as f:
        f.attrs["model"] = "null"
    with pytest.raises(UserError, match="the run has no model spec; pass one with --model"):
        run_probe(nospec, Loss(), RunOptions(steps="last"))
    assert sorted(p.name for p in tiny_run.parent.iterdir()) == ["nospec.h5", "run.h5"]  # no results, lock or temp


def test_model_override_is_checked_and_decides_the_cache(tiny_run):
    from lossatlas.errors import UserError

    first = run_probe(tiny_run, Loss(), RunOptions(steps="last"))
    assert [o.status for o in first.outcomes] == ["computed"]
    same = {"name": "mlp", "kwargs": {"widths": [64, 16, 10]}}  # the run's own spec, written out
    assert [o.status for o in run_probe(tiny_run, Loss(), RunOptions(steps="last", model=same)).outcomes] == ["cached"]
    with pytest.raises(UserError, match="does not match the stored tensors"):  # refused although a result is stored
        run_probe(tiny_run, Loss(), RunOptions(steps="last", model={"name": "mlp", "kwargs": {"widths": [64, 32, 10]}}))
    reseeded = {**same, "seed": 7}  # loads the same checkpoint, but it is another spec: not the stored result's
    other = run_probe(tiny_run, Loss(), RunOptions(steps="last", model=reseeded))
    assert [o.status for o in other.outcomes] == ["recomputed"]
    assert other.results[0].scalar("loss") == first.results[0].scalar("loss")
    assert [o.status for o in run_probe(tiny_run, Loss(), RunOptions(steps="last", model=reseeded)).outcomes] == ["cached"]
