"""Decoder-only transformer language models (GPT-2's block, Radford et al. 2019).

Pre-norm blocks: x + Attn(LN(x)), then x + MLP(LN(x)), with multi-head self-attention
(``F.scaled_dot_product_attention``; causal in a language model, bidirectional in the ViT of
:mod:`~kfacbench.workloads.vit`) and a GELU MLP of width 4d; learned token and position
embeddings, a final LayerNorm and an output layer. Every weight matrix is an ``nn.Linear``
applied to ``(batch, sequence, features)`` inputs: the weight-sharing layers of Eschenhagen et
al. (2023), whose Kronecker factors K-FAC defines by *expanding* or *reducing* over the sequence.
Embeddings, LayerNorms and biases are other parameters.

Two sizes use it: ``text_gpt``'s byte-level model (untied output layer) and GPT-2 small (12
layers, width 768, 12 heads, context 1,024, GPT-2's 50,257-token vocabulary), whose output layer
is *tied* to the token embedding as in GPT-2 (``tie_head``): one (vocab, width) matrix embeds
the input tokens and computes the logits. Curvature methods leave that shared matrix to the
identity (see :func:`~kfacbench.optim.capture.find_layers`). The MLP's GELU is the exact one
where GPT-2 used its tanh approximation: the same shapes and cost.

Initialisation as GPT-2: weights N(0, 0.02), the residual projections N(0, 0.02/√(2L)), biases
zero, LayerNorms at identity; drawn from the given generator only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02


class SelfAttention(nn.Module):
    """Multi-head self-attention; ``causal``: position t attends to positions ≤ t only."""

    def __init__(self, width: int, heads: int, *, causal: bool = True) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm transformer block: attention, then a GELU MLP, each with a residual."""

    def __init__(self, width: int, heads: int, *, causal: bool = True) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal=causal)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.act = nn.GELU()
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(self.act(self.fc(self.ln2(x))))


class ByteGPT(nn.Module):
    """GPT: ``(batch, context)`` token ids (bytes for ``text_gpt``; any integer dtype) →
    ``(batch, context, vocab)`` next-token logits. With ``tie_head`` the output layer's weight
    *is* the token embedding's (GPT-2), so the model holds one (vocab, width) matrix."""

    def __init__(
        self, *, vocab: int, context: int, width: int, depth: int, heads: int, tie_head: bool
    ) -> None:
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tie_head:
            self.head.weight = self.tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens exceeds the context of {self.context}")
        pos = torch.arange(t, device=ids.device)
        x = self.tokens(ids.long()) + self.positions(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def byte_gpt(
    *,
    context: int = 128,
    width: int = 256,
    depth: int = 4,
    heads: int = 4,
    vocab: int = 256,
    tie_head: bool = False,
    generator: torch.Generator | None = None,
) -> ByteGPT:
    """A :class:`ByteGPT` with GPT-2's initialisation (module docstring). A tied output layer
    is initialised once, as the token embedding (``named_parameters`` lists a shared tensor
    once)."""
    model = ByteGPT(
        vocab=vocab, context=context, width=width, depth=depth, heads=heads, tie_head=tie_head
    )
    residual_std = INIT_STD / math.sqrt(2 * depth)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln" in name or name.startswith("ln_"):
                p.fill_(1.0)
            else:
                std = residual_std if name.endswith(("proj.weight", "out.weight")) else INIT_STD
                p.normal_(0.0, std, generator=generator)
    return model
