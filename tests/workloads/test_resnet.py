"""The ImageNet ResNet-50: torchvision's parameter count, its v1.5 layout, shapes at the mini size,
and torchvision's initialisation drawn from the given generator only."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kfacbench.workloads import WORKLOADS
from kfacbench.workloads.resnet import Bottleneck, imagenet_resnet


def bottleneck_resnet_params(blocks: tuple[int, ...], width: int, classes: int) -> int:
    """Parameters counted from He et al.'s Table 1 by hand: a conv k×k from a to b channels has
    k²ab weights (no bias), a BatchNorm of c channels 2c, the classifier (8w·4)·C + C."""
    total = 3 * width * 49 + 2 * width  # 7×7 stem conv and its BatchNorm
    channels = width
    for stage, n in enumerate(blocks):
        w = width * 2**stage
        for block in range(n):
            total += channels * w + 2 * w  # 1×1 reduce
            total += 9 * w * w + 2 * w  # 3×3
            total += w * 4 * w + 2 * 4 * w  # 1×1 expand
            if block == 0:  # projection shortcut (channels change in every first block)
                total += channels * 4 * w + 2 * 4 * w
            channels = 4 * w
    return total + channels * classes + classes


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet50_has_torchvisions_25_557_032_parameters() -> None:
    assert bottleneck_resnet_params((3, 4, 6, 3), 64, 1000) == 25_557_032
    model = WORKLOADS["imagenet_resnet50"].build_model(torch.Generator().manual_seed(0))
    assert count(model) == 25_557_032
    mini = WORKLOADS["imagenet_resnet50_mini"].build_model(torch.Generator())
    assert count(mini) == bottleneck_resnet_params((3, 4, 6, 3), 8, 100)


def test_v1_5_strides_the_3x3_conv_and_the_mini_maps_shrink_as_resnet_50s() -> None:
    workload = WORKLOADS["imagenet_resnet50_mini"]
    model = workload.build_model(torch.Generator().manual_seed(0))
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert isinstance(block.downsample, nn.Sequential) and block.downsample[0].stride == (2, 2)
    assert isinstance(model.layer2[1].downsample, nn.Identity)
    sizes: list[tuple[int, ...]] = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        stage.register_forward_hook(lambda m, a, out: sizes.append(tuple(out.shape[1:])))
    out = model(torch.rand(2, *workload.input_shape))
    assert out.shape == (2, 100)
    # 64×64: stem stride 2 and max-pool stride 2 give 16×16, each later stage halves it.
    assert sizes == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256, 2, 2)]


def test_torchvision_initialisation_from_the_generator_only() -> None:
    state = torch.random.get_rng_state()
    a = imagenet_resnet(generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    b = imagenet_resnet(generator=torch.Generator().manual_seed(3))
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    a.requires_grad_(False)
    conv = a.layer3[0].conv2.weight  # 256 → 256, 3×3: fan_out 2,304
    assert float(conv.std()) == pytest.approx(math.sqrt(2 / 2304), rel=0.01)
    assert float(conv.mean()) == pytest.approx(0.0, abs=1e-3)
    bn = [m for m in a.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in bn)
    bound = 1 / math.sqrt(2048)  # PyTorch's default Linear init: U(±1/√fan_in) for both
    assert float(a.fc.weight.abs().max()) <= bound and float(a.fc.bias.abs().max()) <= bound
    assert float(a.fc.weight.std()) == pytest.approx(bound / math.sqrt(3), rel=0.01)


def test_zero_init_residual_makes_every_block_start_as_its_shortcut() -> None:
    model = imagenet_resnet(
        width=8, num_classes=10, zero_init_residual=True, generator=torch.Generator()
    )
    model.eval().requires_grad_(False)  # running statistics: BatchNorm is then affine
    block = model.layer1[1]
    assert isinstance(block, Bottleneck) and float(block.bn3.weight.abs().max()) == 0.0
    x = torch.rand(2, 32, 4, 4)
    torch.testing.assert_close(block(x), torch.relu(x))
    with pytest.raises(ValueError, match="four stages"):
        imagenet_resnet((3, 4, 6), generator=torch.Generator())
