"""Import every probe module so that each registers itself (the CLI and the conformance test iterate PROBES)."""

from lossatlas.probes import (  # noqa: F401
    collapse,
    connectivity,
    hessian,
    loss,
    sharpness,
    surface,
    trajectory,
    uniformity,
)
