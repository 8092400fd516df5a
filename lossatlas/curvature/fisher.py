"""Fisher information matrices as linear operators: the true Fisher and the empirical Fisher."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, jacrev, vmap

from lossatlas.batches import batch_length, map_inputs
from lossatlas.curvature.base import _PATH_ERRORS, CurvatureOperator
from lossatlas.curvature.ggn import GGNOperator
from lossatlas.losses import per_example_loss, require_output_loss


class FisherOperator(GGNOperator):
    """True Fisher F = (1/N) Σ_i E_{y∼p_θ(·|x_i)}[∇log p ∇log pᵀ], computed exactly.

    For softmax cross-entropy (canonical link) E_y[∇ℓ ∇ℓᵀ] = J_iᵀ (diag(p_i) − p_i p_iᵀ) J_i, so
    F equals the GGN exactly (Martens 2014, §9.2); it is evaluated as that expectation in closed
    form, with no label sampling. For ``mse``/``half_sse`` the likelihood is the Gaussian whose
    negative log-likelihood is the loss, E_y[∇ℓ ∇ℓᵀ] = J_iᵀ H_out J_i: again the GGN with the
    loss's output Hessian ((2/C) I for ``mse``, I for ``half_sse``). Paths as in ``GGNOperator``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lossatlas.curvature import GGNOperator
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        >>> data = [(torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0]))]
        >>> F = FisherOperator(model, data, "cross_entropy")
        >>> V = torch.randn(F.shape[0], 3, dtype=torch.float64)
        >>> torch.allclose(F @ V, GGNOperator(model, data, "cross_entropy") @ V)
        True
    """

    kind = "fisher"


class EmpiricalFisherOperator(CurvatureOperator):
    """Empirical Fisher F_emp v = (1/N) Σ_i g_i (g_iᵀ v), g_i = ∇_θ ℓ_i with the data labels.

    A gradient second moment, ≠ the true Fisher in general (Kunstner, Balles, Hennig 2019,
    "Limitations of the empirical Fisher approximation"). Terms are examples, or tokens for
    (B, T) labels. Per-term gradients G_b (n_b × P) come from one of (``op.path``):

    - ``per_example_vmap``: ``vmap(grad(ℓ(x_i)))`` over the examples (eval mode, one term per
      example: examples do not interact);
    - ``jacrev``: the Jacobian of the batch's per-term loss vector (tokens, or train mode where
      batch statistics couple examples);
    - ``loop``: one backward per term (fallback for ops without vmap support).

    G_b is kept across matmuls while the total stays under ``graph_cache_bytes``; a product is
    then two matrix multiplies. The ``path``/``chunk_size`` arguments: ``chunk_size`` bounds the
    examples per vmap call; ``path`` is not used (there is no Hessian-type path here).

    Example:
        With one example F_emp = g gᵀ, so F_emp g = ‖g‖² g:

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 2).double()
        >>> one = [(torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64), torch.tensor([1]))]
        >>> F = EmpiricalFisherOperator(model, one, "cross_entropy")
        >>> _, g = F.loss_and_gradient()
        >>> torch.allclose(F @ g, (g @ g) * g)
        True
    """

    kind = "empirical_fisher"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # g_i = ∇ℓ_i needs per-example terms of an output-space loss: the model's own loss has none
        require_output_loss(self.loss, f"the {self.kind} curvature (--curvature {self.kind})")

    def _per_term_grads(self, x: Tensor, y: Tensor) -> Tensor:
        theta = self._state["point"]
        per_token = y.ndim == 2 and self.loss in ("cross_entropy", "causal_lm")
        order = []
        if self.mode == "eval" and not per_token:
            order.append("per_example_vmap")
        order += ["jacrev", "loop"]
        for p in order:
            if p in self._failed:
                continue
            try:
                G = getattr(self, f"_grads_{p}")(theta, x, y)
            except _PATH_ERRORS as exc:
                self._failed[p] = exc
                continue
            self.path = p
            return G
        causes = "; ".join(f"{k}: {e}" for k, e in self._failed.items())
        raise RuntimeError(f"EmpiricalFisherOperator: no way to compute per-example gradients worked ({causes})")

    def _grads_per_example_vmap(self, theta, x, y):
        def loss_i(th, xi, yi):
            xi = map_inputs(lambda t: t.unsqueeze(0), xi)
            return per_example_loss(self.loss, self._forward(th, xi), yi.unsqueeze(0)).sum()

        g = vmap(grad(loss_i), in_dims=(None, 0, 0), chunk_size=self.chunk_size)(theta, x, y)
        return torch.cat([g[n].reshape(batch_length(x), -1) for n in self.param_names], dim=1)

    def _grads_jacrev(self, theta, x, y):
        def losses(th):
            return per_example_loss(self.loss, self._forward(th, x), y)

        J = jacrev(losses, chunk_size=self.chunk_size)(theta)
        n = next(iter(J.values())).shape[0]
        return torch.cat([J[name].reshape(n, -1) for name in self.param_names], dim=1)

    def _grads_loop(self, theta, x, y):
        leaves = {k: t.detach().requires_grad_(True) for k, t in theta.items()}
        losses = per_example_loss(self.loss, self._forward(leaves, x), y)
        rows = []
        for i in range(losses.shape[0]):
            gs = torch.autograd.grad(losses[i], list(leaves.values()), retain_graph=True, allow_unused=True)
            rows.append(self._flat_grads(gs))
        return torch.stack(rows)

    def _run_paths(self, M):
        st = self._state
        out = torch.zeros_like(M)
        for b, ((x, y), n_b, w) in enumerate(zip(st["batches"], st["counts"], st["weights"])):
            G = self._graphs.get(b)
            if G is None:
                G = self._per_term_grads(x, y)  # (n_b, P)
                nbytes = G.numel() * G.element_size()
                if not self._graph_budget_hit and self._graph_bytes + nbytes <= self.graph_cache_bytes:
                    self._graphs[b] = G
                    self._graph_bytes += nbytes
                else:
                    self._graph_budget_hit = True
            # (n_b/N)(1/n_b) Σ_i g_i g_iᵀ V; causal_lm's ignored tokens are zero rows, not terms
            terms = n_b if self.loss == "causal_lm" else G.shape[0]
            out += (w / max(terms, 1)) * (G.T @ (G @ M))
        return out
