"""The ImageNet ResNets of He et al. (2016, Table 1) with bottleneck blocks: ResNet-50.

SKFAC's headline results (Tang et al. 2021, §5) and most K-FAC-at-scale papers (Osawa et al.
2019; Pauloski et al. 2020, KAISA) train ResNet-50 on ImageNet-1k. This is the network as
torchvision builds it (``torchvision.models.resnet50``, "ResNet v1.5"), written here because
torchvision is not a dependency:

- stem: 7×7 conv with stride 2, BatchNorm, ReLU, 3×3 max-pool with stride 2;
- four stages of bottleneck blocks (1×1 reduce, 3×3, 1×1 expand ×4; BatchNorm after each conv,
  ReLU after the first two and after the residual addition), 3, 4, 6 and 3 blocks for ResNet-50,
  widths w, 2w, 4w, 8w with w = 64; the first block of stages 2-4 halves the resolution *in its
  3×3 conv* (v1.5; the paper's v1 strides the first 1×1 conv: the same parameters, and NVIDIA's
  ResNet-50 v1.5 notes credit v1.5 with about 0.5% more top-1 accuracy);
- projection shortcuts (option B: 1×1 conv with stride, then BatchNorm) where the shape changes;
- global average pooling and a linear classifier.

Every conv has no bias (BatchNorm follows), so K-FAC's conv factors have no homogeneous
coordinate; the classifier has one. BatchNorm's scale and shift are other parameters (the
momentum path of K-FAC and SKFAC).

Initialisation (torchvision's): convs Kaiming-normal with fan_out = k·k·C_out for ReLU,
BatchNorm weight 1 and bias 0, the classifier PyTorch's default (Kaiming-uniform with a = √5,
bias uniform in ±1/√fan_in). ``zero_init_residual`` sets the last BatchNorm weight of every
block to 0 (Goyal et al. 2017), so each block starts as its shortcut; it is off by
default, as in torchvision, and the registered workloads keep it off. Every value is drawn from
the given generator; construction leaves the global RNG as it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

EXPANSION = 4
"""Output channels of a bottleneck block over its width (He et al. 2016, Fig. 5)."""

RESNET50 = (3, 4, 6, 3)
"""Bottleneck blocks per stage of ResNet-50 (He et al. 2016, Table 1)."""


class Bottleneck(nn.Module):
    """1×1 → 3×3 (stride here: v1.5) → 1×1 convs with BatchNorm, plus the shortcut."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + downsample(x))."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.downsample(x))


class ImageNetResNet(nn.Module):
    """The bottleneck ResNet of :func:`imagenet_resnet`."""

    def __init__(
        self, blocks: Sequence[int], width: int, in_channels: int, num_classes: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages = []
        channels = width
        for i, n in enumerate(blocks):
            stage_width = width * 2**i
            layers = [Bottleneck(channels, stage_width, 1 if i == 0 else 2)]
            channels = stage_width * EXPANSION
            layers += [Bottleneck(channels, stage_width, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_classes)`` for images ``(batch, C, H, W)``."""
        out = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(out.mean(dim=(2, 3)))  # global average pooling


def imagenet_resnet(
    blocks: Sequence[int] = RESNET50,
    *,
    width: int = 64,
    in_channels: int = 3,
    num_classes: int = 1000,
    zero_init_residual: bool = False,
    generator: torch.Generator | None = None,
) -> ImageNetResNet:
    """A bottleneck ResNet initialised as torchvision does (module docstring).

    Args:
        blocks: bottleneck blocks per stage (four stages); ``(3, 4, 6, 3)`` is ResNet-50.
        width: channels of the stem and of the first stage's bottlenecks (64 in the paper);
            stage i has ``width · 2^i``, its blocks output four times that.
        in_channels: channels of the input images.
        num_classes: outputs of the classifier.
        zero_init_residual: start every block's last BatchNorm weight at 0.
        generator: the source of every initial value.

    Returns:
        The network, mapping ``(batch, in_channels, H, W)`` to ``(batch, num_classes)`` for any
        H, W ≥ 32 (global average pooling makes the resolution free).

    Raises:
        ValueError: not four stages, or a stage or size below one.
    """
    if len(blocks) != 4 or min(blocks) < 1 or width < 1:
        raise ValueError(f"need four stages of >= 1 block and width >= 1, got {blocks}, {width}")
    # Module constructors draw their default init from the global RNG: leave it untouched.
    with torch.random.fork_rng(devices=[]):
        model = ImageNetResNet(blocks, width, in_channels, num_classes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(
                    module.weight, mode="fan_out", nonlinearity="relu", generator=generator
                )
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.kaiming_uniform_(model.fc.weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(model.fc.in_features)
        nn.init.uniform_(model.fc.bias, -bound, bound, generator=generator)
        if zero_init_residual:
            for module in model.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)
    return model
