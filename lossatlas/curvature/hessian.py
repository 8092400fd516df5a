"""The Hessian of the data-set mean loss as a linear operator: v ↦ ∇²L(θ) v."""

from __future__ import annotations

import torch
from torch.func import grad, jvp

from lossatlas.curvature.base import CurvatureOperator, grad_or_zeros


class HessianOperator(CurvatureOperator):
    """Hessian-vector products H v = Σ_b (n_b/N) ∇²L_b(θ) v of the mean loss L = (1/N) Σ_i ℓ_i.

    Two exact paths (they agree to ~1e-12 in float64):

    - ``double_backward`` (Pearlmutter 1994): g_b = ∇L_b with ``create_graph=True``, then
      H_b v = ∇(g_b · v). The graphs g_b are kept across vectors and matmuls (up to
      ``graph_cache_bytes``), so a product costs one second backward per batch.
    - ``forward_over_reverse``: ``jvp(grad(L_b), θ, v)`` with torch.func, vmapped over vectors.

    ``path="auto"`` (``CurvatureOperator``) runs the first products of every block-size bucket once
    on each path, timed and sized, then keeps the fastest that fits ``memory_budget``
    (``op.chosen_path``, ``op.path_report()``); the choice changes only rounding.

    Example:
        A quadratic, L(w) = (1/N) Σ_i ½ (wᵀx_i)², has H = XᵀX/N = diag(1, 4)/2 here:

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 1, bias=False).double()
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> H = HessianOperator(model, [(X, torch.zeros(2, 1, dtype=torch.float64))], "half_sse")
        >>> (H @ torch.ones(2, dtype=torch.float64)).tolist()
        [0.5, 2.0]
        >>> (H @ torch.eye(2, dtype=torch.float64)).tolist(), H.matvecs
        ([[0.5, 0.0], [0.0, 2.0]], 3)
    """

    kind = "hessian"

    def _functional_batch_product(self, theta, x, y, n_b):
        def loss_b(th):
            return self._batch_loss(th, x, y)

        def hvp(v):
            return jvp(grad(loss_b), (theta,), (v,))[1]

        return hvp

    def _build_graph(self, leaves, x, y, n_b):
        loss = self._batch_loss(leaves, x, y)
        return torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)

    def _graph_batch_product(self, graph, leaves, x, y, n_b, v, retain):
        vs = [v[n] for n in self.param_names]
        return grad_or_zeros(graph, list(leaves.values()), vs, retain)
