"""A two-layer MLP on modular-arithmetic pairs (a, b): the cheap CPU model that groks.

f(a, b) = (α/√N) · W_out σ(E_a[a] + E_b[b]): the embeddings E_a, E_b (p × N) are the first layer
applied to one-hot a and b, σ is the hidden activation (``quadratic``: σ(h) = h², Gromov 2023,
arXiv 2301.02679; or ``relu``), N the width. The readout is scaled by α/√N (mean-field
normalisation) with α the output scale that controls laziness (Kumar, Bordelon, Gershman, Pehlevan,
ICLR 2024, arXiv 2310.06110: larger α, lazier training, later generalisation). Init: E ~ N(0, 1/2) so that the
pre-activation has unit variance; W_out ~ N(0, 1/N).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lossatlas.checks import check_choice
from lossatlas.models.registry import register_model

ACTIVATIONS: tuple[str, ...] = ("quadratic", "relu")


class ModularMLP(nn.Module):
    """(N, 2) or (N, 3) tokens [a, b(, "=")] → (N, p) logits; the "=" token, if present, is ignored."""

    def __init__(self, p: int = 113, width: int = 512, activation: str = "quadratic", alpha: float = 1.0) -> None:
        super().__init__()
        if int(p) < 2 or int(width) < 1:
            raise ValueError(f"modular_mlp needs p ≥ 2 and width ≥ 1, got p={p}, width={width}")
        check_choice("activation", activation, ACTIVATIONS)
        if not alpha > 0:
            raise ValueError(f"the output scale alpha must be positive, got {alpha}")
        self.p, self.width, self.activation, self.alpha = int(p), int(width), activation, float(alpha)
        self.embed_a = nn.Embedding(self.p, self.width)
        self.embed_b = nn.Embedding(self.p, self.width)
        self.readout = nn.Linear(self.width, self.p, bias=False)
        nn.init.normal_(self.embed_a.weight, std=math.sqrt(0.5))
        nn.init.normal_(self.embed_b.weight, std=math.sqrt(0.5))
        nn.init.normal_(self.readout.weight, std=1.0 / math.sqrt(self.width))

    def forward(self, x: Tensor) -> Tensor:
        """(N, p) logits (α/√width)·W σ(E_a[a] + E_b[b]), σ(h) = h² ("quadratic") or ReLU."""
        if x.ndim != 2 or x.shape[1] not in (2, 3):
            raise ValueError(f"modular_mlp expects (N, 2) or (N, 3) tokens [a, b(, '=')], got shape {tuple(x.shape)}")
        h = self.embed_a(x[:, 0]) + self.embed_b(x[:, 1])  # (N, width)
        h = h * h if self.activation == "quadratic" else torch.relu(h)
        return self.readout(h) * (self.alpha / math.sqrt(self.width))  # (N, p)

    def trace_ntk(self, x: Tensor) -> Tensor:
        """The empirical NTK summed over the p logits, K_ij = Σ_c ⟨∇θ f_c(x_i), ∇θ f_c(x_j)⟩, in closed form.

        With s = α/√N, g = σ(h) and g' = σ'(h): the readout contributes p·s²·⟨g_i, g_j⟩ and the
        embeddings s²·Σ_k (Σ_c W_ck²) g'_ik g'_jk · ([a_i = a_j] + [b_i = b_j]). Returns (n, n).
        """
        with torch.no_grad():
            h = self.embed_a(x[:, 0]) + self.embed_b(x[:, 1])  # (n, N)
            g, dg = (h * h, 2 * h) if self.activation == "quadratic" else (torch.relu(h), (h > 0).to(h.dtype))
            s2 = (self.alpha / math.sqrt(self.width)) ** 2
            col = (self.readout.weight ** 2).sum(0)  # (N,) Σ_c W_ck²
            shared = (x[:, :1] == x[:, 0]).to(h.dtype) + (x[:, 1:2] == x[:, 1]).to(h.dtype)  # (n, n)
            return s2 * (self.p * (g @ g.T) + shared * ((dg * col) @ dg.T))


@register_model("modular_mlp")
def build_modular_mlp(p: int = 113, width: int = 512, activation: str = "quadratic", alpha: float = 1.0) -> ModularMLP:
    """The modular MLP; defaults fit ``modular_arithmetic``'s defaults (p = 113)."""
    return ModularMLP(p=p, width=width, activation=activation, alpha=alpha)
