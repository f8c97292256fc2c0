"""The networks of the benchmark workloads, written here because torchvision is not a dependency.

- :func:`deep_autoencoder`: the deep autoencoders of Hinton & Salakhutdinov (2006), the test
  problems of K-FAC (Martens & Grosse 2015, §13) and of Hessian-free optimisation (Martens 2010).
- :func:`cifar_resnet`: the CIFAR ResNets of He et al. (2016, §4.2), the test problems of SKFAC
  (Tang et al. 2021) and of most K-FAC-on-convnets papers.

Both are plain chains of ``nn.Linear`` / ``nn.Conv2d`` layers, the layer types whose Kronecker
factors ``optim/capture.py`` knows how to capture.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

SPARSE_FAN_IN = 15
"""Non-zero incoming weights per unit of the sparse initialisation (Martens 2010, §5)."""


def deep_autoencoder(
    encoder_sizes: Sequence[int],
    *,
    init: Literal["sparse", "xavier"] = "sparse",
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """A deep autoencoder of Hinton & Salakhutdinov (2006) as used by Martens & Grosse (2015, §13).

    ``encoder_sizes = (784, 1000, 500, 250, 30)`` builds 784-1000-500-250-30-250-500-1000-784: the
    decoder mirrors the encoder with its own (untied) weights. Hidden units are logistic; the code
    layer (the last encoder size) is linear, as in the paper; the output layer has no activation
    because the loss owns it (Bernoulli NLL on logits for MNIST/CURVES, squared error on a linear
    output for FACES).

    The result is a flat ``nn.Sequential`` of ``nn.Linear`` and ``nn.Sigmoid`` modules only, so
    K-FAC sees the Linear layers as a chain in forward order, which is what its block-tridiagonal
    inverse assumes (Martens & Grosse 2015, §4.3).

    Args:
        encoder_sizes: input size, hidden sizes, code size (at least two sizes).
        init: ``"sparse"`` (Martens 2010, §5; the K-FAC paper's choice): each unit gets
            ``min(15, fan_in)`` non-zero incoming weights drawn from N(0, 1), the rest zero;
            ``"xavier"``: Glorot-uniform weights. Biases are zero in both.
        generator: source of randomness; a seeded generator gives the same weights every time.
            With a generator, construction draws nothing from the global RNG.

    Returns:
        The autoencoder, mapping (batch, encoder_sizes[0]) to (batch, encoder_sizes[0]).

    Raises:
        ValueError: fewer than two sizes, a non-positive size, or an unknown ``init``.
    """
    sizes = list(encoder_sizes)
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"encoder_sizes needs at least two positive sizes, got {sizes}")
    if init not in ("sparse", "xavier"):
        raise ValueError(f"unknown init {init!r}; known: sparse, xavier")
    widths = sizes + sizes[-2::-1]
    code_layer = len(sizes) - 2  # index of the Linear that maps into the code
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        # skip_init: no wasted default init, and no draw from the global RNG.
        linear = torch.nn.utils.skip_init(nn.Linear, fan_in, fan_out)
        with torch.no_grad():
            if init == "sparse":
                linear.weight.copy_(_sparse_weight(fan_out, fan_in, generator))
            else:
                nn.init.xavier_uniform_(linear.weight, generator=generator)
            linear.bias.zero_()
        layers.append(linear)
        if i != code_layer and i != len(widths) - 2:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def _sparse_weight(fan_out: int, fan_in: int, generator: torch.Generator | None) -> torch.Tensor:
    """Martens' (2010, §5) sparse initialisation of one (fan_out, fan_in) weight matrix.

    Limiting every unit to 15 incoming connections keeps its total input of order one whatever
    the fan-in, so units start unsaturated yet differ strongly from each other, without the tiny
    weights a dense scaled init needs for large fan-ins. The scale N(0, 1) is the one stated by
    Sutskever et al. (2013, §3.1) for this initialisation; Martens (2010) puts biases at zero for
    logistic units (0.5 only for tanh units, which are not used here).
    """
    k = min(SPARSE_FAN_IN, fan_in)
    # A random permutation of the inputs per unit (argsort of uniform keys); keep the first k.
    chosen = torch.rand(fan_out, fan_in, generator=generator).argsort(dim=1)[:, :k]
    weight = torch.zeros(fan_out, fan_in)
    weight.scatter_(1, chosen, torch.randn(fan_out, k, generator=generator))
    return weight


class _ShortcutA(nn.Module):
    """He et al.'s (2016, §4.2) option-A shortcut: identity, subsampled and zero-padded.

    When a block halves the resolution and widens the channels, the shortcut takes every other
    pixel and appends zero channels, so the residual network has exactly as many parameters as
    the plain one it is compared with in the paper's CIFAR experiments.
    """

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Subsample by ``stride`` and pad ``extra_channels`` zero channels at the end."""
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads the last dimensions first: (W, W, H, H, C_before, C_after).
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with a residual connection (He et al. 2016, Fig. 2).

    ReLU after the first BN and after the addition, as in the original (pre-v2) ResNet.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = (
            _ShortcutA(stride, out_channels - in_channels)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The 6n+2-layer CIFAR ResNet of He et al. (2016, §4.2); see :func:`cifar_resnet`."""

    def __init__(self, n: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He et al. (2015) init with fan_out = k·k·C_out, as in fb.resnet.torch, the
                # public reproduction of the paper's training recipe.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, n: int, stride: int) -> nn.Sequential:
        """n basic blocks; only the first one changes resolution and width."""
        blocks = [BasicBlock(in_channels, out_channels, stride)]
        blocks += [BasicBlock(out_channels, out_channels, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes) for images of shape (batch, C, H, W)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(out.mean(dim=(2, 3)))  # global average pooling


def cifar_resnet(depth: int, *, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """The CIFAR ResNet of He et al. (2016, §4.2) with ``depth = 6n + 2`` weighted layers.

    A 3×3 conv with 16 filters, three stages of n basic blocks with 16, 32 and 64 filters (stride
    2 at the first block of stages 2 and 3), global average pooling and a linear classifier.
    Every conv is followed by BatchNorm (so convs have no bias) and ReLU. Shortcuts are the
    parameter-free option A of the paper's CIFAR experiments. Global average pooling makes the
    input size free: 3×32×32 CIFAR images and 1×28×28 Fashion-MNIST images both work.

    Weights are drawn from the global RNG (seed it, or fork it, for reproducible models): convs
    Kaiming-normal with fan_out, the classifier Kaiming-normal with fan_in and a zero bias,
    BatchNorm scale one and shift zero.

    Args:
        depth: 6n + 2 for n ≥ 1 (20, 32, 44, 56, 110, ...).
        in_channels: channels of the input images.
        num_classes: outputs of the classifier.

    Returns:
        The network, mapping (batch, in_channels, H, W) to logits (batch, num_classes).

    Raises:
        ValueError: ``depth`` is not of the form 6n + 2 with n ≥ 1.
    """
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, ...), got {depth}")
    return CifarResNet((depth - 2) // 6, in_channels, num_classes)


def resnet20(*, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """ResNet-20 (n = 3, 0.27M parameters for 10 classes); see :func:`cifar_resnet`."""
    return cifar_resnet(20, in_channels=in_channels, num_classes=num_classes)


def resnet32(*, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """ResNet-32 (n = 5, 0.46M parameters for 10 classes); see :func:`cifar_resnet`."""
    return cifar_resnet(32, in_channels=in_channels, num_classes=num_classes)
