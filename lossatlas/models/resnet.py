"""A small ResNet with BasicBlocks and a switch that removes the skip connections.

Li, Xu, Taylor, Studer, Goldstein 2018 ("Visualizing the loss landscape of neural nets",
NeurIPS 2018) compare ResNets with their "no-short" variants: the same blocks without the
shortcut, whose landscapes turn chaotic with depth. ``skip=False`` builds that variant.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from lossatlas.models.cnn import as_images
from lossatlas.models.mlp import make_activation
from lossatlas.models.registry import register_model


class BasicBlock(nn.Module):
    """y = σ(bn2(conv2(σ(bn1(conv1(x))))) + shortcut(x)), σ = ReLU by default; no shortcut when skip=False.

    The shortcut is the identity when shapes match, else a 1×1 strided conv + BatchNorm
    (He et al. 2016, option B). With ``skip=False`` the block has no ``shortcut`` module at all.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, skip: bool = True, activation: str = "relu") -> None:
        super().__init__()
        self.act = make_activation(activation)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.skip = bool(skip)
        self.shortcut: nn.Module | None = None
        if self.skip:
            if stride != 1 or in_channels != out_channels:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
                )
            else:
                self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_out, S/stride, S/stride) block output of (N, C_in, S, S) features."""
        out = self.act(self.bn1(self.conv1(x)))  # (N, C_out, S/stride, S/stride)
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.act(out)


class ResNet(nn.Module):
    """Stem conv3×3-BN-σ, stages of BasicBlocks, global average pooling and a linear classifier.

    Every stage but the first starts with stride 2.

    Blocks are named ``stages.<i>.<j>``; the stem ``stem``; the head ``classifier``. σ is ReLU by
    default; a smooth ``activation`` ("gelu", "tanh") makes the loss twice differentiable everywhere.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32),
        blocks_per_stage: int | Sequence[int] = 1,
        skip: bool = True,
        image_size: int = 8,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if isinstance(blocks_per_stage, int):
            blocks = [int(blocks_per_stage)] * len(widths)
        else:
            blocks = [int(b) for b in blocks_per_stage]
        if not widths or any(w <= 0 for w in widths):
            raise ValueError(f"widths must list positive channel counts, got {widths}")
        if len(blocks) != len(widths) or any(b <= 0 for b in blocks):
            raise ValueError(f"blocks_per_stage must be a positive int or one positive int per width, got {blocks_per_stage}")
        self.in_channels, self.image_size, self.skip = int(in_channels), int(image_size), bool(skip)
        self.stem = nn.Sequential(
            nn.Conv2d(self.in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            make_activation(activation),
        )
        stages = []
        fan_in = widths[0]
        for i, (width, count) in enumerate(zip(widths, blocks)):
            stage = [
                BasicBlock(fan_in if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1, skip=skip, activation=activation)
                for j in range(count)
            ]
            stages.append(nn.Sequential(*stage))
            fan_in = width
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(N, num_classes) logits of (N, C, S, S) images or their (N, C·S·S) flattening."""
        x = as_images(x, self.in_channels, self.image_size)  # (N, C, S, S)
        x = self.stages(self.stem(x))  # (N, widths[-1], S', S')
        return self.classifier(x.mean(dim=(2, 3)))  # (N, num_classes)


@register_model("resnet")
def build_resnet(
    in_channels: int = 1,
    num_classes: int = 10,
    widths: Sequence[int] = (16, 32),
    blocks_per_stage: int | Sequence[int] = 1,
    skip: bool = True,
    image_size: int = 8,
    activation: str = "relu",
) -> ResNet:
    """The small ResNet; ``skip=False`` is Li et al.'s no-short variant (defaults: 1×8×8 digits)."""
    return ResNet(in_channels, num_classes, widths, blocks_per_stage, skip, image_size, activation)
