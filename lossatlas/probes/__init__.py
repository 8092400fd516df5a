"""Per-checkpoint measurements: pure functions of (model, data, loss, settings). No files, no plots."""

from lossatlas.probes.base import PROBES, Probe, ProbeContext, Result, get_probe, register_probe

__all__ = ["PROBES", "Probe", "ProbeContext", "Result", "get_probe", "register_probe"]
