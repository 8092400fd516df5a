"""Import every probe module so that each registers itself (the CLI and the conformance test iterate PROBES)."""

from lossatlas.probes import collapse, evaluate, sharpness, uniformity  # noqa: F401
