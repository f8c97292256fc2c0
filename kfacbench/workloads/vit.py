"""Vision Transformers (Dosovitskiy et al. 2021): ViT-S/16 as DeiT and timm define it.

The K-FAC users of today precondition ViTs (Eschenhagen et al. 2023 train them with K-FAC's
expand and reduce approximations; SINGD, Lin et al. 2024, reports ViT results). The network:

- patch embedding: a P×P conv with stride P (one token per patch, width d), flattened to
  ``(batch, patches, d)``;
- a learned class token prepended, a learned position embedding added (one per token);
- L pre-norm blocks, x + Attn(LN(x)) then x + MLP(LN(x)), with *bidirectional* multi-head
  self-attention and a GELU MLP of width 4d: :class:`~kfacbench.workloads.transformer.Block`,
  the same block as the GPT models with ``causal=False``;
- a final LayerNorm and a linear head on the class token.

ViT-S/16 (Touvron et al. 2021, DeiT-S; timm's ``vit_small_patch16_224``): P = 16, d = 384,
L = 12, 6 heads, MLP 1,536, 224×224 images, 1,000 classes: 22,050,664 parameters.

For K-FAC the patch embedding is a conv layer (one patch row per position, 196 at 224×224),
every block weight a Linear layer shared over the 197 tokens (expand/reduce, Eschenhagen et al.
2023) and the head an ordinary Linear layer. The class token and the position embedding live in
:class:`ClassTokenAndPositions` (module ``embed``): other parameters, like the LayerNorms.

Initialisation (timm's default for ViTs): Linear weights truncated N(0, 0.02) within ±2, biases
zero, LayerNorms at identity, the position embedding truncated N(0, 0.02), the class token
N(0, 10⁻⁶), the patch conv PyTorch's default (Kaiming-uniform, a = √5; bias uniform in
±1/√fan_in). Drawn from the given generator only; construction leaves the global RNG as it was.
The LayerNorms keep PyTorch's ε = 10⁻⁵ (timm's ViTs use 10⁻⁶), shared with the GPT block.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from kfacbench.workloads.transformer import Block

INIT_STD = 0.02


class ClassTokenAndPositions(nn.Module):
    """Prepends the learned class token to the patch tokens and adds the position embedding."""

    def __init__(self, width: int, patches: int) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.positions = nn.Parameter(torch.zeros(1, patches + 1, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, patches, width)`` → ``(batch, patches + 1, width)``."""
        cls = self.cls.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.positions


class VisionTransformer(nn.Module):
    """The ViT of :func:`vision_transformer`."""

    def __init__(
        self,
        *,
        image_size: int,
        patch: int,
        in_channels: int,
        width: int,
        depth: int,
        heads: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.patch = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.embed = ClassTokenAndPositions(width, (image_size // patch) ** 2)
        self.blocks = nn.ModuleList(Block(width, heads, causal=False) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, num_classes)`` for images ``(batch, C, H, W)``."""
        tokens = self.embed(self.patch(x).flatten(2).transpose(1, 2))
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.ln_f(tokens[:, 0]))


def vision_transformer(
    *,
    image_size: int = 224,
    patch: int = 16,
    in_channels: int = 3,
    width: int = 384,
    depth: int = 12,
    heads: int = 6,
    num_classes: int = 1000,
    generator: torch.Generator | None = None,
) -> VisionTransformer:
    """A ViT initialised as timm does (module docstring); the defaults are ViT-S/16.

    Raises:
        ValueError: ``image_size`` not a multiple of ``patch``, or ``width`` not of ``heads``.
    """
    if image_size % patch:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
    with torch.random.fork_rng(devices=[]):  # constructors draw from the global RNG
        model = VisionTransformer(
            image_size=image_size,
            patch=patch,
            in_channels=in_channels,
            width=width,
            depth=depth,
            heads=heads,
            num_classes=num_classes,
        )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD, generator=generator)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        conv = model.patch
        nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(conv.weight[0].numel())
        nn.init.uniform_(cast(torch.Tensor, conv.bias), -bound, bound, generator=generator)
        nn.init.trunc_normal_(model.embed.positions, std=INIT_STD, generator=generator)
        nn.init.normal_(model.embed.cls, std=1e-6, generator=generator)
    return model
