"""The generalized Gauss-Newton matrix as a linear operator: v ↦ (1/N) Σ_i J_iᵀ H_out,i J_i v."""

from __future__ import annotations

import torch
from torch.func import jvp, vjp

from lossatlas.curvature.base import CurvatureOperator, grad_or_zeros
from lossatlas.losses import output_hessian_product, require_output_loss


class GGNOperator(CurvatureOperator):
    """GGN-vector products G v = Σ_b (n_b/N) (1/n_b) Σ_i J_iᵀ H_out,i J_i v.

    J_i = ∂f(x_i)/∂θ, H_out,i = ∂²ℓ_i/∂f² (softmax-CE: diag(p) − p pᵀ; ``mse``: (2/C) I;
    ``half_sse``: I). Sequence models with (B, T, V) logits count every token as an example.
    Schraudolph 2002; Martens 2014 ("New insights and perspectives on the natural gradient").

    - ``forward_over_reverse``: u = J v by ``torch.func.jvp`` on the outputs, H_out u, then the
      batch's ``vjp`` (built once per batch, vmapped over vectors).
    - ``double_backward``: J v by the double-vjp trick (J v = ∂/∂w (Jᵀw)·v), J ᵀ(·) by a backward
      of the kept output graph; the graph is reused across vectors and matmuls.

    Example:
        A model linear in θ has no second-order term in f, so its GGN is its Hessian:

        >>> import torch
        >>> from torch import nn
        >>> from lossatlas.curvature import HessianOperator
        >>> model = nn.Linear(3, 2).double()
        >>> data = [(torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1]))]
        >>> G = GGNOperator(model, data, "cross_entropy")
        >>> G.shape
        (8, 8)
        >>> V = torch.randn(8, 4, dtype=torch.float64)
        >>> torch.allclose(G @ V, HessianOperator(model, data, "cross_entropy") @ V)
        True
    """

    kind = "ggn"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # J_iᵀ H_out,i J_i needs the loss as a function of the outputs: the model's own loss is not one
        require_output_loss(self.loss, f"the {self.kind} curvature (--curvature {self.kind})")

    def _functional_batch_product(self, theta, x, y, n_b):
        def out_of(th):
            return self._forward(th, x)

        out, pullback = vjp(out_of, theta)
        out = out.detach()

        def ggn_v(v):
            u = jvp(out_of, (theta,), (v,))[1]
            return pullback(output_hessian_product(self.loss, out, y, u) / n_b)[0]

        return ggn_v

    def _build_graph(self, leaves, x, y, n_b):
        out = self._forward(leaves, x)
        w = torch.zeros_like(out, requires_grad=True)
        jt_w = torch.autograd.grad(out, list(leaves.values()), w, create_graph=True, allow_unused=True)
        return out, w, jt_w

    def _graph_batch_product(self, graph, leaves, x, y, n_b, v, retain):
        out, w, jt_w = graph
        vs = [v[n] for n in self.param_names]
        (u,) = grad_or_zeros(jt_w, [w], vs, True)  # J v, shaped like the output
        if u is None:
            u = torch.zeros_like(out)
        hu = output_hessian_product(self.loss, out.detach(), y, u) / n_b
        return grad_or_zeros([out], list(leaves.values()), [hu], retain)
