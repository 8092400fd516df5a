"""Every registered probe on a CUDA device: it runs, and its result has the CPU run's arrays, shapes and finiteness.

Random directions and probe vectors come from generators on the model's device, whose streams differ between
CPU and CUDA, so the numbers are not compared; the same keys, dims, shapes and finite entries are. The
conformance settings (``FAST``) and models of ``test_conformance`` are reused. Skipped without a GPU.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_conformance import FAST, NEEDS_TRANSFORMER, _adam_state, _ctx, context_parts, gpt_parts  # noqa: F401

from lossatlas.probes import PROBES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _on(device: str, model, batches, states):
    """The model, its batches and its checkpoint states on ``device`` (copies; the fixtures stay on the CPU)."""
    moved = copy.deepcopy(model).to(device)
    data = [tuple(t.to(device) for t in b) for b in batches]
    return moved, data, states


@pytest.mark.parametrize("name", sorted(FAST))
def test_probe_runs_on_cuda_like_on_the_cpu(name, request):
    parts = request.getfixturevalue("gpt_parts" if name in NEEDS_TRANSFORMER else "context_parts")
    probe = PROBES[name](**FAST[name])
    results = {}
    for device in ("cpu", "cuda"):
        model, data, states = _on(device, *parts)
        opt = _adam_state(model) if probe.needs_optimizer_state else None
        results[device] = probe.run(_ctx(model, data, states, opt))
    cpu, gpu = results["cpu"], results["cuda"]
    assert gpu.values.keys() == cpu.values.keys()
    for k, v in cpu.values.items():
        a, b = np.asarray(v), np.asarray(gpu.values[k])
        assert b.shape == a.shape and gpu.dims[k] == cpu.dims[k], f"{name}: {k}"
        if a.dtype.kind == "f":
            np.testing.assert_array_equal(np.isfinite(b), np.isfinite(a), err_msg=f"{name}: {k}")
