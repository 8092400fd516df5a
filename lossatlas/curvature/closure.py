"""The Hessian of a closure loss ``loss_fn(model, batch)`` as a linear operator: v ↦ ∇²L(θ) v.

L(θ) = Σ_b w_b L_b(θ) with L_b(θ) = loss_fn(model at θ, batch b) and w_b = n_b / Σ n_b, n_b the batch's size
or the count the closure returns as ``(loss, count)`` (``lossatlas.losses.LossClosure``). The products are the
Hessian operator's (Pearlmutter 1994, "Fast Exact Multiplication by the Hessian": double backward, or
forward-over-reverse with torch.func), on the closure instead of a loss of the outputs. Batches are never
merged (a contrastive or regularised closure is not a mean of per-example terms), and the GGN and Fisher
operators refuse a closure: they need a loss of the model's outputs.
"""

from __future__ import annotations

from typing import Any

import torch

from lossatlas.batches import map_inputs
from lossatlas.curvature.base import DETERMINISM_EXAMPLES
from lossatlas.curvature.hessian import HessianOperator
from lossatlas.errors import UserError
from lossatlas.losses import LossClosure, closure_call, closure_count


class ClosureHessianOperator(HessianOperator):
    """Hessian-vector products of a closure loss, H v = Σ_b w_b ∇²L_b(θ) v.

    Takes the arguments of ``CurvatureOperator`` with ``loss`` a callable ``loss_fn(model, batch)`` (or a
    ``LossClosure``); ``coalesce_examples`` is forced to 0 (batches are the closure's own units).

    Example:
        L(w) = ½‖w‖² + mean_i ½(wᵀx_i)²: H = I + XᵀX/N.

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> fn = lambda m, b: 0.5 * (m.weight ** 2).sum() + 0.5 * (m(b[0]) ** 2).mean()
        >>> H = ClosureHessianOperator(model, [(X, torch.zeros(2))], fn)
        >>> (H @ torch.eye(2, dtype=torch.float64)).tolist()
        [[1.5, 0.0], [0.0, 3.0]]
    """

    kind = "hessian"

    def __init__(self, model: torch.nn.Module, data: Any, loss: Any, **kw: Any) -> None:
        kw["coalesce_examples"] = 0  # merging batches would change a closure that is no per-example mean
        super().__init__(model, data, LossClosure(loss), **kw)

    def _params(self, theta):
        """Every tensor of the model at θ: the fixed parameters, the buffers (fresh copies in train mode), θ."""
        st = self._state
        buffers = st["buffers"]
        if self.mode == "train":
            buffers = {k: (None if v is None else v.clone()) for k, v in buffers.items()}
        return {**st["fixed"], **{k: v for k, v in buffers.items() if v is not None}, **theta}

    def _batch_loss(self, theta, x, y):
        """The closure's value L_b(θ) on the batch (x, y), with grad mode on (it may differentiate its inputs)."""
        with torch.enable_grad():
            return closure_call(self.loss, self._model, self._params(theta), (x, y))[0]

    def _ready(self):
        """The base setup, then the weights from the counts the closure returns (if it returns them)."""
        if self._state is not None:
            return self._state
        st = super()._ready()
        if st["batches"] and not st.get("closure_counted"):
            st["closure_counted"] = True
            first = self._count(st, *st["batches"][0])
            if first is not None:  # the closure counts its terms: weight every batch by its own count
                if self.dist.active:
                    raise UserError("a loss closure that returns (loss, count) is not supported under torchrun; "
                                    "return the batch's mean loss alone, or run on one process")
                counts = [first] + [self._count(st, x, y) or closure_count(x, y) for x, y in st["batches"][1:]]
                total = sum(counts)
                if total <= 0:
                    raise ValueError("the loss closure counted no terms in the data; return a positive count")
                st["counts"], st["weights"], st["total"] = counts, [c / total for c in counts], total
        return st

    def _count(self, st, x, y) -> int | None:
        """The count the closure returns on one batch at θ (None when it returns the loss alone)."""
        with torch.enable_grad(), self._modes():  # a closure may differentiate through its inputs
            return closure_call(self.loss, self._model, self._params(st["point"]), (x, y))[1]

    def _check_deterministic(self) -> None:
        """Two evaluations of the closure on the first ``DETERMINISM_EXAMPLES`` examples must agree bit for bit."""
        if not self._state["batches"]:
            return
        x, y = self._state["batches"][0]
        x = map_inputs(lambda t: t[:DETERMINISM_EXAMPLES], x)
        y = y[:DETERMINISM_EXAMPLES] if hasattr(y, "shape") and y.ndim > 0 else y
        with torch.enable_grad(), self._modes(), torch.random.fork_rng(devices=[]):
            a = self._batch_loss(self._state["point"], x, y).detach()
            b = self._batch_loss(self._state["point"], x, y).detach()
        if not torch.equal(a, b):
            raise ValueError(f"the loss closure {self.loss} differs between two identical evaluations in "
                             f"mode={self.mode!r} (dropout or another stochastic layer is active); use mode='eval'")


__all__ = ["ClosureHessianOperator"]
