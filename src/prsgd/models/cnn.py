"""A small convolutional network for 28x28 (Fashion-)MNIST-like images: the CPU experiments' workhorse."""

from __future__ import annotations

from torch import Tensor, nn


class SmallCNN(nn.Module):
    """conv(16, 3x3) - ReLU - maxpool 2 - conv(32, 3x3) - ReLU - maxpool 2 - linear(64) - ReLU - linear."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * side * side, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
