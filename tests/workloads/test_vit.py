"""ViT-S/16: its parameter count, the patch embedding as a strided conv in row-major patch
order, bidirectional attention, the class token and positions, timm's initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfacbench.core.problem import Problem
from kfacbench.optim import MethodContext, get_method
from kfacbench.workloads import WORKLOADS
from kfacbench.workloads.vit import vision_transformer

CPU = torch.device("cpu")


def vit_params(image: int, patch: int, d: int, depth: int, classes: int) -> int:
    """Parameters counted by hand: the patch conv 3P²d + d, the class token d, positions (N+1)d,
    per block two LayerNorms 4d, qkv 3d² + 3d, proj d² + d, MLP 4d² + 4d and 4d² + d; the final
    LayerNorm 2d and the head dC + C."""
    n = (image // patch) ** 2
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    return 3 * patch**2 * d + d + d + (n + 1) * d + depth * block + 2 * d + d * classes + classes


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_vit_s16_has_22_050_664_parameters() -> None:
    assert vit_params(224, 16, 384, 12, 1000) == 22_050_664  # timm's vit_small_patch16_224
    model = WORKLOADS["imagenet_vit_s16"].build_model(torch.Generator().manual_seed(0))
    assert count(model) == 22_050_664
    assert len(model.blocks) == 12 and model.blocks[0].attn.heads == 6
    assert model.blocks[0].fc.out_features == 1536
    mini = WORKLOADS["imagenet_vit_mini"].build_model(torch.Generator())
    assert count(mini) == vit_params(64, 16, 64, 2, 100)


def test_patch_tokens_are_a_matmul_over_row_major_16x16_patches() -> None:
    model = vision_transformer(
        image_size=64, width=8, depth=1, heads=2, num_classes=5, generator=torch.Generator()
    ).requires_grad_(False)
    x = torch.rand(2, 3, 64, 64)
    tokens = model.patch(x).flatten(2).transpose(1, 2)  # what forward() embeds
    w = model.patch.weight.reshape(8, -1)
    for row in range(4):
        for col in range(4):
            patch = x[:, :, 16 * row : 16 * row + 16, 16 * col : 16 * col + 16].reshape(2, -1)
            want = patch @ w.T + model.patch.bias
            torch.testing.assert_close(tokens[:, 4 * row + col], want)
    assert model(x).shape == (2, 5)


def test_attention_is_bidirectional_and_positions_and_class_token_matter() -> None:
    model = vision_transformer(
        image_size=64, width=16, depth=1, heads=2, num_classes=5, generator=torch.Generator()
    ).requires_grad_(False)
    assert not model.blocks[0].attn.causal
    seen: list[torch.Tensor] = []
    model.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out))
    x = torch.rand(1, 3, 64, 64)
    changed = x.clone()
    changed[:, :, 48:, 48:] += 1.0  # the last patch only
    model(x), model(changed)
    before, after = seen
    # Token 1 (the first patch) sees the last one: a causal mask would keep it unchanged.
    assert not torch.allclose(before[:, 1], after[:, 1])
    base = model(x)
    gen = torch.Generator().manual_seed(0)
    model.embed.positions[:, 3] += torch.randn(16, generator=gen)  # not a constant: LN drops it
    moved = model(x)
    assert not torch.allclose(moved, base)
    model.embed.cls += torch.randn(16, generator=gen)
    assert not torch.allclose(model(x), moved)


def test_timm_initialisation_from_the_generator_only() -> None:
    state = torch.random.get_rng_state()
    a = vision_transformer(generator=torch.Generator().manual_seed(2)).requires_grad_(False)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = vision_transformer(generator=torch.Generator().manual_seed(2))
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    fc = a.blocks[3].fc.weight
    assert float(fc.std()) == pytest.approx(0.02, rel=0.01) and float(fc.abs().max()) <= 2.0
    assert float(a.blocks[3].attn.qkv.bias.abs().max()) == 0.0
    assert float(a.embed.positions.std()) == pytest.approx(0.02, rel=0.02)
    assert float(a.embed.cls.std()) == pytest.approx(1e-6, rel=0.2)
    assert float((a.ln_f.weight - 1).abs().max()) == 0.0
    bound = 1 / (3 * 16 * 16) ** 0.5  # PyTorch's default conv init: U(±1/√fan_in)
    assert float(a.patch.weight.abs().max()) <= bound


def test_kfac_preconditions_the_patch_conv_blocks_and_head_not_the_embeddings() -> None:
    model = WORKLOADS["imagenet_vit_mini"].build_model(torch.Generator().manual_seed(0))
    spec = get_method("kfac-fast")
    hp = {k: v.default for k, v in spec.hparams.items()} | {"inv_interval": 10}
    method = spec.build(Problem(model, "categorical"), hp, MethodContext(None, 0, CPU))
    info = method.info()
    assert info["preconditioned"][0] == "patch" and info["preconditioned"][-1] == "head"
    assert "blocks.1.attn.qkv" in info["preconditioned"]
    assert info["identity_preconditioner"] == [
        "embed",
        "blocks.0.ln1",
        "blocks.0.ln2",
        "blocks.1.ln1",
        "blocks.1.ln2",
        "ln_f",
    ]
