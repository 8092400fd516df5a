"""Curvature operators: Hessian, GGN, true and empirical Fisher products over a fixed data set.

Each operator is a symmetric P×P linear map with ``shape``, ``dtype``, ``device`` and ``@``
(vectors (P,) or blocks (P, K)), exportable with ``to_scipy()``; estimators (eigenvalues, trace,
density) take anything with ``shape`` and ``@``, as in curvlinops (f-dangel/curvlinops).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lossatlas.checks import check_choice
from lossatlas.curvature.activations import ActivationCurvatureOperator
from lossatlas.curvature.base import AUTO_BATCHED_MIN_K, MODES, PATHS, CurvatureOperator
from lossatlas.curvature.blocks import parameter_blocks, resolve_params, select_parameters
from lossatlas.curvature.fisher import EmpiricalFisherOperator, FisherOperator
from lossatlas.curvature.ggn import GGNOperator
from lossatlas.curvature.hessian import HessianOperator
from lossatlas.curvature.kfac import EKFACOperator, KFACOperator
from lossatlas.errors import UserError

CURVATURES: tuple[str, ...] = ("hessian", "ggn", "fisher", "empirical_fisher")

_OPERATORS: dict[str, type[CurvatureOperator]] = {
    "hessian": HessianOperator,
    "ggn": GGNOperator,
    "fisher": FisherOperator,
    "empirical_fisher": EmpiricalFisherOperator,
}


def make_operator(kind: str, model: nn.Module, data: Any, loss: str = "cross_entropy", **kw: Any) -> CurvatureOperator:
    """The curvature operator named ``kind`` (one of ``CURVATURES``); ``kw`` as in ``CurvatureOperator``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 2).double()
        >>> data = [(torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1]))]
        >>> G = make_operator("ggn", model, data, "cross_entropy")
        >>> type(G).__name__, G.kind, G.shape
        ('GGNOperator', 'ggn', (8, 8))
    """
    check_choice("curvature", kind, CURVATURES)
    from lossatlas.losses import is_closure

    if is_closure(loss) or (callable(loss) and not isinstance(loss, str)):  # a loss_fn(model, batch) closure
        if kind != "hessian":
            raise UserError(f"curvature {kind!r} needs a loss of the model's outputs (its output Hessian), which a "
                            "loss closure does not give; use curvature='hessian' with the closure")
        from lossatlas.curvature.closure import ClosureHessianOperator

        return ClosureHessianOperator(model, data, loss, **kw)
    return _OPERATORS[kind](model, data, loss, **kw)


__all__ = [
    # operators
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "FisherOperator",
    "EmpiricalFisherOperator",
    "KFACOperator",
    "EKFACOperator",
    "ActivationCurvatureOperator",
    "make_operator",
    "CURVATURES",
    # options
    "PATHS",
    "MODES",
    "AUTO_BATCHED_MIN_K",
    # parameter selection
    "parameter_blocks",
    "select_parameters",
    "resolve_params",
]
