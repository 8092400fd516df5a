"""Import every probe module so that each registers itself (the CLI and the conformance test iterate PROBES)."""

from lossatlas.probes import (  # noqa: F401
    adam_sharpness,
    batch_scan,
    block_heterogeneity,
    collapse,
    connectivity,
    critical_sharpness,
    curve,
    ggn_decomposition,
    hessian,
    hessian_blocks,
    hessian_ci,
    loss,
    opposing_signals,
    sharpness,
    similarity,
    surface,
    topology,
    trajectory,
    uniformity,
    weight_spectra,
)
