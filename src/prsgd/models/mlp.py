"""A multilayer perceptron for flat or flattened inputs."""

from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """Flatten, then ``depth`` hidden layers of ``hidden`` units with ReLU, then a linear classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 64, depth: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
