"""A small convolutional network for small images (8×8 digits by default)."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from lossatlas.models.mlp import make_activation
from lossatlas.models.registry import register_model

# On 1×8×8 digits with 10 classes: conv 1→16 (160) + conv 16→32 (4,640) + conv 32→64 (18,496)
# + linear 64·2·2→10 (2,570) = 25,866 parameters.
REFERENCE_CHANNELS: tuple[int, ...] = (16, 32, 64)


def as_images(x: Tensor, in_channels: int, image_size: int) -> Tensor:
    """(N, C·S·S) flat inputs (the digits' 64-vectors) as (N, C, S, S) images; 4-d inputs pass."""
    if x.ndim == 4:
        return x
    expected = in_channels * image_size * image_size
    if x.ndim == 2 and x.shape[1] == expected:
        return x.reshape(x.shape[0], in_channels, image_size, image_size)
    raise ValueError(
        f"expected images (N, {in_channels}, {image_size}, {image_size}) or flat (N, {expected}) inputs, "
        f"got shape {tuple(x.shape)}; set in_channels and image_size to match the data"
    )


class CNN(nn.Module):
    """Conv3×3 → σ, then for every later stage Conv3×3 → σ → MaxPool2, then a linear classifier.

    Spatial size S → S → S/2 → S/4 …: with channels (16, 32, 64) an 8×8 image ends at 64×2×2.
    ``features`` holds the conv stack, ``classifier`` the final Linear.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = REFERENCE_CHANNELS,
        image_size: int = 8,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels or any(c <= 0 for c in channels) or in_channels <= 0 or num_classes <= 0:
            raise ValueError(f"channels, in_channels and num_classes must be positive; got channels={channels}")
        final_size = int(image_size) // 2 ** (len(channels) - 1)
        if final_size < 1:
            raise ValueError(
                f"image_size {image_size} is too small for {len(channels)} conv stages (each after the first halves it); "
                "use fewer channels entries or a larger image_size"
            )
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        layers: list[nn.Module] = []
        fan_in = self.in_channels
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(fan_in, c, kernel_size=3, padding=1), make_activation(activation)]
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            fan_in = c
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels[-1] * final_size * final_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(N, num_classes) logits of (N, C, S, S) images or their (N, C·S·S) flattening."""
        x = as_images(x, self.in_channels, self.image_size)  # (N, C, S, S)
        x = self.features(x)  # (N, c_last, S', S')
        return self.classifier(x.flatten(1))  # (N, num_classes)


@register_model("cnn")
def build_cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    channels: Sequence[int] = REFERENCE_CHANNELS,
    image_size: int = 8,
    activation: str = "relu",
) -> CNN:
    """The CNN; defaults are the reference CNN on 1×8×8 digits, 10 classes (25,866 parameters)."""
    return CNN(in_channels=in_channels, num_classes=num_classes, channels=channels, image_size=image_size, activation=activation)
