"""Block-tridiagonal inverse (§4.3) against the dense matrices of its definition.

Vec convention of the dense side (the paper's): vec stacks columns, so a layer's ``(out, in)``
gradient matrix V becomes ``V.mT.flatten()`` and its Fisher block is ``torch.kron(A, G)``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from kfacbench.optim.tridiag import tridiag_apply, tridiag_inverse


@dataclass
class Chain:
    """Factors of a chain of layers, from one joint sample so that F̃ is a real second moment."""

    diag_a: list[Tensor]  # damped Ā_{i-1,i-1}
    diag_g: list[Tensor]  # damped G_{i,i}
    cross_a: list[Tensor]  # Ā_{i-1,i}
    cross_g: list[Tensor]  # G_{i,i+1}
    blocks: list[list[Tensor]]  # dense F̃_{i,j} = Ā_{i-1,j-1} ⊗ G_{i,j} (diagonal damped)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(g.shape[0], a.shape[0]) for a, g in zip(self.diag_a, self.diag_g, strict=True)]


def chain(in_dim: int, outs: list[int], *, seed: int, damping: float = 0.1, m: int = 64) -> Chain:
    """A chain with ``in_i = out_{i-1} + 1`` (ā_i is layer i's output with a 1 appended).

    Activations and output-gradients of all layers are drawn jointly (correlated across layers)
    and every factor is a moment of that one sample, as K-FAC's estimates are.
    """
    gen = torch.Generator().manual_seed(seed)
    ins = [in_dim] + [o + 1 for o in outs[:-1]]

    def joint(dims: list[int]) -> list[Tensor]:
        mix = torch.randn(sum(dims), sum(dims), generator=gen, dtype=torch.float64)
        x = torch.randn(m, sum(dims), generator=gen, dtype=torch.float64) @ mix
        return list(torch.split(x, dims, dim=1))

    ones = torch.ones(m, 1, dtype=torch.float64)
    acts = [torch.cat([x, ones], dim=1) for x in joint([d - 1 for d in ins])]
    grads = joint(outs)

    def moment(x: Tensor, y: Tensor) -> Tensor:
        return x.T @ y / m

    n = len(outs)
    diag_a = [moment(a, a) + damping * torch.eye(a.shape[1], dtype=a.dtype) for a in acts]
    diag_g = [moment(g, g) + damping * torch.eye(g.shape[1], dtype=g.dtype) for g in grads]
    blocks = [
        [
            torch.kron(diag_a[i], diag_g[i])
            if i == j
            else torch.kron(moment(acts[i], acts[j]), moment(grads[i], grads[j]))
            for j in range(n)
        ]
        for i in range(n)
    ]
    return Chain(
        diag_a,
        diag_g,
        [moment(a0, a1) for a0, a1 in itertools.pairwise(acts)],
        [moment(g0, g1) for g0, g1 in itertools.pairwise(grads)],
        blocks,
    )


def vec(mats: list[Tensor]) -> Tensor:
    return torch.cat([v.mT.flatten() for v in mats])


def unvec(x: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    parts = torch.split(x, [o * i for o, i in shapes])
    return [p.reshape(i, o).mT for p, (o, i) in zip(parts, shapes, strict=True)]


def dense_fhat_inv(c: Chain) -> Tensor:
    """F̂⁻¹ = Ξᵀ Λ Ξ from dense blocks of F̃, straight from the definitions of §4.3."""
    f = c.blocks
    n = len(f)
    sizes = [f[i][i].shape[0] for i in range(n)]
    offsets = [0, *itertools.accumulate(sizes)]
    xi = torch.eye(offsets[-1], dtype=torch.float64)
    lam = torch.zeros_like(xi)
    for i in range(n):
        sl = slice(offsets[i], offsets[i + 1])
        sigma = f[i][i]
        if i < n - 1:
            nxt = slice(offsets[i + 1], offsets[i + 2])
            psi = f[i][i + 1] @ torch.linalg.inv(f[i + 1][i + 1])
            sigma = f[i][i] - psi @ f[i + 1][i + 1] @ psi.T
            xi[sl, nxt] = -psi
        lam[sl, sl] = torch.linalg.inv(sigma)
    return xi.T @ lam @ xi


def operator_matrix(c: Chain) -> Tensor:
    """The dense matrix of vec ↦ vec(tridiag_apply(·)): tridiag_apply on every basis vector."""
    inv = tridiag_inverse(c.diag_a, c.diag_g, c.cross_a, c.cross_g)
    eye = torch.eye(sum(o * i for o, i in c.shapes), dtype=torch.float64)
    return torch.stack([vec(tridiag_apply(inv, unvec(e, c.shapes))) for e in eye], dim=1)


def random_grads(shapes: list[tuple[int, int]], seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


CHAINS = [(3, [4, 2, 5]), (5, [2, 3, 4, 3]), (2, [5, 4, 2, 2])]


@pytest.mark.parametrize(("in_dim", "outs"), CHAINS)
def test_apply_matches_dense_definition(in_dim: int, outs: list[int]) -> None:
    c = chain(in_dim, outs, seed=len(outs) + in_dim)
    grads = random_grads(c.shapes, seed=7)
    inv = tridiag_inverse(c.diag_a, c.diag_g, c.cross_a, c.cross_g)
    got = tridiag_apply(inv, grads)
    assert [tuple(w.shape) for w in got] == c.shapes
    want = dense_fhat_inv(c) @ vec(grads)
    torch.testing.assert_close(vec(got), want, rtol=1e-9, atol=1e-9)
    # Not vacuous: the block-diagonal inverse is a different answer here.
    blockdiag = [
        torch.linalg.solve(g, v) @ torch.linalg.inv(a)
        for v, a, g in zip(grads, c.diag_a, c.diag_g, strict=True)
    ]
    assert not torch.allclose(vec(blockdiag), want, rtol=1e-3)


@pytest.mark.parametrize(("in_dim", "outs"), CHAINS)
def test_fhat_matches_ftilde_on_tridiagonal_blocks(in_dim: int, outs: list[int]) -> None:
    c = chain(in_dim, outs, seed=3 * len(outs) + in_dim)
    op = operator_matrix(c)
    torch.testing.assert_close(op, op.T, rtol=1e-9, atol=1e-9)
    assert torch.linalg.eigvalsh(op).min() > 0
    fhat = torch.linalg.inv(op)
    sizes = [o * i for o, i in c.shapes]
    offsets = [0, *itertools.accumulate(sizes)]
    n = len(sizes)
    for i, j in itertools.product(range(n), range(n)):
        block = fhat[offsets[i] : offsets[i + 1], offsets[j] : offsets[j + 1]]
        inv_block = op[offsets[i] : offsets[i + 1], offsets[j] : offsets[j + 1]]
        if abs(i - j) <= 1:
            torch.testing.assert_close(block, c.blocks[i][j], rtol=1e-8, atol=1e-8)
        else:  # F̂⁻¹ is block-tridiagonal; F̂ (like F̃) is not
            assert inv_block.abs().max() < 1e-9
            assert block.abs().max() > 1e-3


def test_one_layer_is_the_block_diagonal_inverse() -> None:
    c = chain(4, [3], seed=0)
    (v,) = random_grads(c.shapes, seed=1)
    inv = tridiag_inverse(c.diag_a, c.diag_g, [], [])
    (got,) = tridiag_apply(inv, [v])
    want = torch.linalg.solve(c.diag_g[0], v) @ torch.linalg.inv(c.diag_a[0])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_zero_cross_factors_give_the_block_diagonal_inverse() -> None:
    c = chain(3, [4, 2, 5], seed=4)
    grads = random_grads(c.shapes, seed=5)
    inv = tridiag_inverse(
        c.diag_a,
        c.diag_g,
        [torch.zeros_like(x) for x in c.cross_a],
        [torch.zeros_like(x) for x in c.cross_g],
    )
    got = tridiag_apply(inv, grads)
    for w, v, a, g in zip(got, grads, c.diag_a, c.diag_g, strict=True):
        torch.testing.assert_close(
            w, torch.linalg.solve(g, v) @ torch.linalg.inv(a), rtol=1e-10, atol=1e-10
        )


def test_float32_factors_give_float32_pieces_close_to_float64() -> None:
    c = chain(5, [2, 3, 4, 3], seed=9)
    grads = random_grads(c.shapes, seed=2)
    want = tridiag_apply(tridiag_inverse(c.diag_a, c.diag_g, c.cross_a, c.cross_g), grads)
    single = [[t.float() for t in ts] for ts in (c.diag_a, c.diag_g, c.cross_a, c.cross_g)]
    inv = tridiag_inverse(*single)
    assert {
        t.dtype
        for t in [*inv.psi_a, *inv.psi_g, *inv.k_a, *inv.k_g, *inv.scale, inv.a_inv, inv.g_inv]
    } == {torch.float32}
    got = tridiag_apply(inv, [v.float() for v in grads])
    for w32, w64 in zip(got, want, strict=True):
        assert w32.dtype == torch.float32
        torch.testing.assert_close(w32.double(), w64, rtol=1e-4, atol=1e-4 * w64.abs().max().item())


def test_bad_inputs_are_value_errors() -> None:
    c = chain(3, [4, 2], seed=6)
    with pytest.raises(ValueError, match="ℓ − 1 cross"):
        tridiag_inverse(c.diag_a, c.diag_g, [], [])
    with pytest.raises(ValueError, match="cross factors of layers 0, 1"):
        tridiag_inverse(c.diag_a, c.diag_g, [c.cross_a[0].T], c.cross_g)
    singular = [torch.zeros_like(c.diag_a[0]), c.diag_a[1]]
    with pytest.raises(ValueError, match="Ā of layer 0 is not positive definite"):
        tridiag_inverse(singular, c.diag_g, c.cross_a, c.cross_g)
    inv = tridiag_inverse(c.diag_a, c.diag_g, c.cross_a, c.cross_g)
    with pytest.raises(ValueError, match="3 gradient matrices for a chain of 2"):
        tridiag_apply(inv, random_grads([*c.shapes, (2, 2)], seed=0))
