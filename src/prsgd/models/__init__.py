"""Models written in plain torch, built by name."""

from __future__ import annotations

import math

from torch import nn

from prsgd.errors import InvalidArgument, check_choice, check_int
from prsgd.models.cnn import SmallCNN
from prsgd.models.gpt import GPT
from prsgd.models.mlp import MLP
from prsgd.models.resnet import CifarResNet, ResNet50

CIFAR_DEPTHS = (8, 20, 32, 44, 56, 110)
MODEL_NAMES = ("mlp", "cnn", *(f"resnet{d}" for d in CIFAR_DEPTHS), "resnet50", "gpt")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, hidden: int = 64) -> nn.Module:
    """``mlp`` (any input), ``cnn`` (square images), ``resnet8``...``resnet110`` (CIFAR ResNets), ``resnet50``, ``gpt``
    (token sequences: a 2-layer, 4-head GPT of width ``hidden`` over ``num_classes`` tokens)."""
    check_choice("model", name, MODEL_NAMES)
    if (
        not isinstance(input_shape, tuple | list)
        or not input_shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_shape)
    ):
        raise InvalidArgument(
            f"input_shape={input_shape!r} is not allowed; it must be a non-empty tuple of integers >= 1"
        )
    check_int("num_classes", num_classes, 1)
    check_int("hidden", hidden, 1)
    if name == "mlp":
        return MLP(math.prod(input_shape), num_classes, hidden=hidden)
    if name == "gpt":
        if len(input_shape) != 1 or hidden % 4:
            raise InvalidArgument(
                f"model='gpt' needs token sequences (one dimension: the context) and a width (model.hidden) divisible "
                f"by its 4 heads; got inputs of shape {input_shape} and hidden={hidden}"
            )
        return GPT(vocab=num_classes, context=input_shape[0], width=hidden)
    if len(input_shape) != 3:
        raise InvalidArgument(
            f"model={name!r} needs image inputs (C, H, W); this dataset's inputs have shape {input_shape}"
        )
    channels = input_shape[0]
    if name == "cnn":
        if input_shape[1] != input_shape[2] or input_shape[1] < 4:
            raise InvalidArgument(
                f"model='cnn' needs square images of at least 4 x 4 pixels (two 2 x 2 poolings); got {input_shape}"
            )
        return SmallCNN(channels, num_classes, image_size=input_shape[1])
    if name == "resnet50":
        return ResNet50(num_classes, in_channels=channels)
    return CifarResNet(int(name.removeprefix("resnet")), num_classes, in_channels=channels)


__all__ = ["GPT", "MLP", "MODEL_NAMES", "CifarResNet", "ResNet50", "SmallCNN", "build_model"]
