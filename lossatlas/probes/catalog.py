"""What ``plot``, ``report`` and ``info`` need to know of each built-in probe, without importing it (nor torch).

The probe modules import torch (a few seconds); the commands that only read stored results need no more of a probe
than its declarations: its report ``section``, ``title``, ``figure``, the ``usage`` of the command that stores its
results, and the probe it is a ``part_of`` (with the owner's ``part_fields``). ``CATALOG`` holds them for every
module of ``lossatlas.probes.registry``, in registration order; ``declared()`` gives the table to read: the catalog,
with every probe class registered in this process (the built-ins once the registry is imported, and any probe a user
registered) taking its entry's place. ``tests/test_fast_start.py`` checks that the catalog equals the classes'
own declarations, so the two cannot drift apart.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence, Union

if TYPE_CHECKING:
    from lossatlas.probes.base import Result


@dataclass(frozen=True)
class ProbeInfo:
    """The declarations of one probe class (``lossatlas.probes.base.Probe`` documents each)."""

    name: str
    section: str = "other"
    title: str = ""
    figure: str | None = None
    usage: str = "--steps all"
    part_of: str | None = None
    part_fields: tuple[str, ...] = ()
    switch: str | None = None

    def merge(self, own: "Result", parts: Sequence["Result"]) -> "Result":
        """``own`` with its parts' values merged in, as ``Probe.merge`` of the probe's class does it."""
        from lossatlas.probes.base import Probe

        out = Probe.merge.__func__(self, own, parts)  # the class method on these declarations (no class needed)
        for part in parts:  # the part's switch, which Probe.merge finds only for a registered part class
            info = declared().get(part.probe)
            if out is not own and info is not None and info.switch is not None:
                out.config[info.switch] = True
        return out


_HESSIAN_PART_FIELDS = ("blocks", "block_k", "data_ci", "data_resamples", "ci_level", "preconditioned",
                        "batch_size_scan", "scan_batches")

# every probe of lossatlas.probes.registry, in the order the registry registers them
CATALOG: dict[str, ProbeInfo] = {p.name: p for p in (
    ProbeInfo("adam_sharpness", "curvature", "Adam's preconditioned sharpness", None, "--steps all", "hessian",
              switch="preconditioned"),
    ProbeInfo("batch_scan", "curvature", "mini-batch λ_max vs batch size", None,
              "--steps last --batch-size-scan 16 64 256", "hessian"),
    ProbeInfo("block_heterogeneity", "curvature", "block heterogeneity of the Hessian", "block_heterogeneity",
              "--steps first"),
    ProbeInfo("collapse", "representations", "", "collapse"),
    ProbeInfo("interpolate", "landscape", "", "interpolate", "--step 0 --to-step LAST"),
    ProbeInfo("sharpness", "sharpness", "", "sharpness"),  # before critical_sharpness, which imports it
    ProbeInfo("critical_sharpness", "curvature", "critical sharpness along the update", "critical_sharpness"),
    ProbeInfo("curve", "landscape", "Curved mode connectivity", "curve", "--step 0 --to-step LAST"),
    ProbeInfo("ggn_decomposition", "curvature", "GGN class / cross-class / within-class decomposition", None,
              "--steps last"),
    ProbeInfo("hessian_blocks", "curvature", "per-layer spectra", None, "--steps last --blocks layers", "hessian"),
    ProbeInfo("hessian_ci", "curvature", "λ_max and trace: bootstrap intervals", None, "--steps last --trace",
              "hessian", switch="data_ci"),
    ProbeInfo("hessian", "curvature", "", "hessian", "--steps all", None, _HESSIAN_PART_FIELDS),
    ProbeInfo("loss", "overview", "", "loss"),
    ProbeInfo("massive_activations", "representations", "Massive activations and attention sinks",
              "massive_activations", "--steps last"),
    ProbeInfo("opposing_signals", "overview", "Opposing signals", None, "--step last"),
    ProbeInfo("similarity", "representations", "Representation similarity", "similarity", "--step LAST --to-step 0"),
    ProbeInfo("surface", "landscape", "", "surface", "--step last"),
    ProbeInfo("topology", "landscape", "Landscape topology", "topology", "--step last"),
    ProbeInfo("trajectory", "landscape", "", "trajectory", ""),
    ProbeInfo("uniformity", "representations", "", "uniformity"),
    ProbeInfo("weight_spectra", "representations", "Weight spectra (data-free)", "weight_spectra"),
)}

FIELDS: tuple[str, ...] = ("section", "title", "figure", "usage", "part_of", "part_fields", "switch")


def declared() -> Mapping[str, Union[ProbeInfo, type]]:
    """Each known probe's declarations by name: the catalog, overridden by the probe classes registered so far.

    Reading it imports no probe module: a probe class is used only once something else imported it.
    """
    base = sys.modules.get("lossatlas.probes.base")  # no probe is registered before the base module is imported
    return {**CATALOG, **(base.PROBES if base is not None else {})}


__all__ = ["CATALOG", "FIELDS", "ProbeInfo", "declared"]
