"""The workload networks: autoencoder layout and sparse init, CIFAR ResNet sizes and shapes."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from torch import nn

from kfacbench.workloads.nets import cifar_resnet, deep_autoencoder, resnet20, resnet32

MNIST = (784, 1000, 500, 250, 30)
CURVES = (784, 400, 200, 100, 50, 25, 6)


def layout(model: nn.Sequential) -> list[tuple[int, int] | str]:
    """Linear layers as (in, out), activations by name, in order."""
    return [
        (m.in_features, m.out_features) if isinstance(m, nn.Linear) else type(m).__name__
        for m in model
    ]


def test_mnist_autoencoder_layout() -> None:
    model = deep_autoencoder(MNIST, generator=torch.Generator().manual_seed(0))
    s = "Sigmoid"
    assert layout(model) == [
        (784, 1000), s, (1000, 500), s, (500, 250), s,
        (250, 30),  # linear code layer
        (30, 250), s, (250, 500), s, (500, 1000), s,
        (1000, 784),  # output: the loss applies the sigmoid
    ]  # fmt: skip
    assert all(m.bias is not None for m in model if isinstance(m, nn.Linear))
    x = torch.rand(5, 784)
    assert model(x).shape == (5, 784)


def test_curves_autoencoder_layout() -> None:
    model = deep_autoencoder(CURVES, init="xavier", generator=torch.Generator().manual_seed(0))
    linears = [(m.in_features, m.out_features) for m in model if isinstance(m, nn.Linear)]
    assert linears == [
        (784, 400), (400, 200), (200, 100), (100, 50), (50, 25), (25, 6),
        (6, 25), (25, 50), (50, 100), (100, 200), (200, 400), (400, 784),
    ]  # fmt: skip
    # A Sigmoid after every Linear except the code layer (6th) and the output layer (12th).
    kinds = layout(model)
    assert kinds.count("Sigmoid") == 10
    code = kinds.index((25, 6))
    assert kinds[code + 1] == (6, 25)
    assert kinds[-1] == (400, 784)
    assert all(isinstance(m, nn.Linear | nn.Sigmoid) for m in model)
    assert model(torch.rand(3, 784)).shape == (3, 784)


@pytest.mark.parametrize("sizes", [MNIST, CURVES, (20, 10, 4)])
def test_sparse_init_has_min_15_fan_in_nonzeros_per_unit(sizes: tuple[int, ...]) -> None:
    model = deep_autoencoder(sizes, generator=torch.Generator().manual_seed(1))
    for m in model:
        if isinstance(m, nn.Linear):
            nonzeros = (m.weight != 0).sum(dim=1)
            assert torch.all(nonzeros == min(15, m.in_features)), (m, nonzeros.unique())
            assert torch.all(m.bias == 0)


def test_sparse_init_weights_are_unit_gaussian() -> None:
    model = deep_autoencoder(MNIST, generator=torch.Generator().manual_seed(2))
    values = torch.cat([m.weight[m.weight != 0] for m in model if isinstance(m, nn.Linear)])
    assert abs(values.mean().item()) < 0.02
    assert values.std().item() == pytest.approx(1.0, abs=0.02)


def test_xavier_init_is_glorot_uniform_with_zero_bias() -> None:
    model = deep_autoencoder(MNIST, init="xavier", generator=torch.Generator().manual_seed(3))
    first = model[0]
    assert isinstance(first, nn.Linear)
    bound = (6 / (784 + 1000)) ** 0.5
    assert first.weight.abs().max().item() <= bound
    assert first.weight.abs().max().item() > 0.95 * bound
    assert torch.all(first.bias == 0)


@pytest.mark.parametrize("init", ["sparse", "xavier"])
def test_autoencoder_init_is_seeded(init: Literal["sparse", "xavier"]) -> None:
    def weights(seed: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return list(deep_autoencoder(CURVES, init=init, generator=gen).state_dict().values())

    torch.manual_seed(0)
    a = weights(7)
    torch.manual_seed(1)  # the global RNG plays no part
    b = weights(7)
    c = weights(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_autoencoder_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least two"):
        deep_autoencoder((784,))
    with pytest.raises(ValueError, match="unknown init"):
        deep_autoencoder(MNIST, init="orthogonal")  # type: ignore[arg-type]


def resnet_param_count(n: int, in_channels: int = 3, num_classes: int = 10) -> int:
    """Parameters of the 6n+2 CIFAR ResNet, counted from the architecture of He et al. §4.2."""

    def conv_bn(c_in: int, c_out: int) -> int:
        return 3 * 3 * c_in * c_out + 2 * c_out  # bias-free 3x3 conv + BN scale and shift

    total = conv_bn(in_channels, 16)
    c_in = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv_bn(c_in, width) + conv_bn(width, width)  # option A shortcut: no params
            c_in = width
    return total + 64 * num_classes + num_classes


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet_parameter_counts() -> None:
    assert resnet_param_count(3) == 269_722  # the formula agrees with the published ≈0.27M
    assert resnet_param_count(5) == 464_154  # and ≈0.46M
    assert n_params(resnet20()) == resnet_param_count(3)
    assert n_params(resnet32()) == resnet_param_count(5)
    assert n_params(cifar_resnet(44)) == resnet_param_count(7)
    assert n_params(resnet20(in_channels=1, num_classes=7)) == resnet_param_count(3, 1, 7)


def test_resnet_layers() -> None:
    model = resnet20()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19  # + the classifier = 20 weighted layers
    assert all(c.bias is None and c.kernel_size == (3, 3) for c in convs)
    assert [c.stride for c in convs].count((2, 2)) == 2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 19
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1


@pytest.mark.parametrize(("shape", "in_channels"), [((4, 3, 32, 32), 3), ((4, 1, 28, 28), 1)])
def test_resnet_output_shape_and_backward(shape: tuple[int, ...], in_channels: int) -> None:
    torch.manual_seed(0)
    model = resnet20(in_channels=in_channels)
    out = model(torch.randn(shape))
    assert out.shape == (4, 10)
    nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.get_parameter("conv1.weight").grad.abs().sum() > 0  # type: ignore[union-attr]


def test_resnet_shortcut_subsamples_and_zero_pads() -> None:
    """With the residual branch silenced, a downsampling block is relu(shortcut(x))."""
    model = resnet20()
    block = model.get_submodule("layer2.0")
    nn.init.zeros_(block.get_parameter("bn2.weight"))
    nn.init.zeros_(block.get_parameter("bn2.bias"))
    x = torch.randn(2, 16, 8, 8)
    out = block.eval()(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, :16], torch.relu(x[:, :, ::2, ::2]))
    assert torch.all(out[:, 16:] == 0)


def test_resnet32_output_shape() -> None:
    assert resnet32()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("depth", [0, 2, 19, 21, 33])
def test_resnet_rejects_bad_depth(depth: int) -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(depth)
