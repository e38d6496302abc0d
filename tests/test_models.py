"""Models: the published parameter counts and the forward shapes."""

from __future__ import annotations

import pytest
import torch

from prsgd.models import build_model


@pytest.mark.parametrize(("name", "count", "published"), [("resnet20", 269_722, 0.27e6), ("resnet56", 853_018, 0.85e6)])
def test_cifar_resnet_parameter_counts_match_he_et_al(name, count, published):
    model = build_model(name, (3, 32, 32), 10)
    n = sum(p.numel() for p in model.parameters())
    assert n == count and round(n / 1e4) * 1e4 == published
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet50_parameter_count():
    model = build_model("resnet50", (3, 64, 64), 1000)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("name", ["cnn", "resnet8", "mlp"])
def test_small_models_on_fashion_mnist_shapes(name):
    model = build_model(name, (1, 28, 28), 10)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_bad_model_names_and_inputs():
    with pytest.raises(ValueError, match=r"model='vgg' is not known; allowed: mlp, cnn, resnet8"):
        build_model("vgg", (3, 32, 32), 10)
    with pytest.raises(ValueError, match=r"model='cnn' needs image inputs"):
        build_model("cnn", (64,), 10)
