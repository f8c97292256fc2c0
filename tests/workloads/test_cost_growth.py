"""The cost-growth families: names that parse back to their axes, and models of those shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfacbench.errors import KfacbenchError
from kfacbench.optim.flops import LayerShape, layer_shapes
from kfacbench.workloads import WORKLOADS
from kfacbench.workloads.scaling import (
    BLOCK_CONTEXT,
    BLOCK_SEQ_WIDTH,
    BLOCK_SEQS,
    BLOCK_WIDTHS,
    MLP_WIDTHS,
    Shape,
    shape_of,
    square_mlp,
)


def test_names_parse_back_to_their_axes() -> None:
    assert shape_of("mlp_2048") == Shape("mlp", 2048, 1)
    assert shape_of("block_512_64") == Shape("block", 512, 64)
    for name in ("wide_ae_256", "mlp_", "mlp_2x", "block_512", "text_gpt", "mlp_256_8"):
        assert shape_of(name) is None


def test_every_member_is_registered_once_per_shape() -> None:
    family = {n: shape_of(n) for n in WORKLOADS if shape_of(n) is not None}
    assert {s.width for s in family.values() if s.family == "mlp"} == set(MLP_WIDTHS)
    blocks = {(s.width, s.seq) for s in family.values() if s.family == "block"}
    want = {(w, BLOCK_CONTEXT) for w in BLOCK_WIDTHS} | {(BLOCK_SEQ_WIDTH, t) for t in BLOCK_SEQS}
    assert blocks == want


def test_the_square_mlp_is_four_square_layers_between_a_small_input_and_head() -> None:
    model = square_mlp(32, features=5, classes=3, generator=torch.Generator().manual_seed(0))
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(5, 32), *[(32, 32)] * 4, (32, 3)]
    assert sum(isinstance(m, nn.ReLU) for m in model) == 5
    assert all(int(torch.count_nonzero(m.bias)) == 0 for m in linears)


def test_the_square_mlp_is_he_initialised_and_seeded() -> None:
    a, b, c = (square_mlp(512, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1))
    assert torch.equal(a[2].weight, b[2].weight) and not torch.equal(a[2].weight, c[2].weight)
    std = float(a[2].weight.detach().std())
    assert abs(std - (2 / 512) ** 0.5) < 0.02 * std


def test_the_layer_shapes_grow_with_the_name() -> None:
    mlp = WORKLOADS["mlp_256"]
    shapes = layer_shapes(mlp.build_model(torch.Generator()), mlp.input_shape)
    assert shapes[1:5] == [LayerShape(257, 256, 1)] * 4
    block = WORKLOADS["block_256_32"]
    shapes = layer_shapes(block.build_model(torch.Generator()), block.input_shape)
    # qkv, proj, the MLP's two layers (4W), the byte head: every one at T positions
    assert shapes == [
        LayerShape(257, 768, 32),
        LayerShape(257, 256, 32),
        LayerShape(257, 1024, 32),
        LayerShape(1025, 256, 32),
        LayerShape(256, 256, 32),
    ]


@pytest.mark.parametrize("name", ["mlp_256", "block_128_128"])
def test_real_data_is_refused_in_one_line(name: str) -> None:
    with pytest.raises(
        KfacbenchError, match=f'^workload {name}: generated data only; set data = "synthetic"$'
    ):
        WORKLOADS[name].load_data("real")
