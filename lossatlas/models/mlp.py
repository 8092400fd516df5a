"""A fully connected network: the reference MLP of the demo and the benchmarks."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from lossatlas.checks import check_choice
from lossatlas.models.registry import register_model

ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "gelu", "linear")

# 64 → 128 → 128 → 10 on the 64-pixel digits: 8,320 + 16,512 + 1,290 = 26,122 parameters.
REFERENCE_WIDTHS: tuple[int, ...] = (64, 128, 128, 10)


def make_activation(name: str) -> nn.Module:
    """A fresh, out-of-place activation module by name (in-place ones break double backward)."""
    check_choice("activation", name, ACTIVATIONS)
    if name == "relu":
        return nn.ReLU()
    if name == "tanh":
        return nn.Tanh()
    if name == "gelu":
        return nn.GELU()
    return nn.Identity()  # linear


class MLP(nn.Module):
    """f(x) = W_L σ(… σ(W_1 flatten(x) + b_1) …) + b_L, widths = (input dim, hidden…, outputs).

    Layers are ``layers.0``, ``layers.2``, … (Linear) with activations in between; no activation
    after the last layer. The input is flattened from dim 1, so (N, 1, 8, 8) and (N, 64) both work.
    """

    def __init__(self, widths: Sequence[int] = REFERENCE_WIDTHS, activation: str = "relu", bias: bool = True) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or any(w <= 0 for w in widths):
            raise ValueError(f"widths must list at least an input and an output size, all positive; got {widths}")
        make_activation(activation)  # validate before building
        self.widths = tuple(widths)
        self.activation = activation
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(fan_in, fan_out, bias=bias))
            if i < len(widths) - 2:
                layers.append(make_activation(activation))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(N, widths[-1]) outputs of inputs flattening to (N, widths[0]); ValueError for another input size."""
        x = x.flatten(1)  # (N, D)
        if x.shape[1] != self.widths[0]:
            raise ValueError(f"MLP expects {self.widths[0]} input features, got {x.shape[1]}; set widths[0] to the input size")
        return self.layers(x)  # (N, C)


@register_model("mlp")
def build_mlp(widths: Sequence[int] = REFERENCE_WIDTHS, activation: str = "relu", bias: bool = True) -> MLP:
    """The MLP; defaults are the reference MLP, 64 → 128 → 128 → 10 ReLU (26,122 parameters)."""
    return MLP(widths=widths, activation=activation, bias=bias)
