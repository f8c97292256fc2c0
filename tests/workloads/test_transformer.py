"""The GPT models: shapes, causality, initialisation, their per-token loss and metrics, and GPT-2
small's size with its output layer tied to the token embedding, which every curvature method
leaves to the identity and updates once."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kfacbench.core.loop import evaluate
from kfacbench.core.problem import Problem, per_example_loss
from kfacbench.core.timing import PhaseTimer
from kfacbench.optim import MethodContext, get_method
from kfacbench.optim.capture import find_layers, shared_modules
from kfacbench.workloads import WORKLOADS, get_workload
from kfacbench.workloads.transformer import byte_gpt

CPU = torch.device("cpu")


def tiny(seed: int = 0) -> torch.nn.Module:
    return byte_gpt(
        context=16, width=32, depth=2, heads=4, generator=torch.Generator().manual_seed(seed)
    )


def test_logits_at_every_position_and_the_default_size() -> None:
    ids = torch.randint(256, (3, 16), dtype=torch.uint8)
    assert tiny()(ids).shape == (3, 16, 256)
    n = sum(p.numel() for p in get_workload("text_gpt").build_model(torch.Generator()).parameters())
    assert 3_000_000 < n < 4_000_000  # 4 layers × 12·256² + embeddings and the output layer


def test_attention_is_causal() -> None:
    model = tiny()
    ids = torch.randint(256, (1, 16))
    changed = ids.clone()
    changed[0, 9] = (changed[0, 9] + 1) % 256
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9])  # the past does not see the future
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_initialisation_is_seeded_and_gpt2_scaled() -> None:
    a, b = tiny(1), tiny(1)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    big = byte_gpt(context=16, width=256, depth=4, heads=4, generator=torch.Generator())
    big.requires_grad_(False)
    assert float(big.blocks[0].fc.weight.std()) == pytest.approx(0.02, rel=0.02)
    assert float(big.blocks[0].out.weight.std()) == pytest.approx(0.02 / math.sqrt(8), rel=0.03)
    assert float(big.blocks[0].attn.qkv.bias.abs().max()) == 0.0
    assert float((big.ln_f.weight - 1).abs().max()) == 0.0


def test_sequence_loss_is_the_mean_per_token_nll_and_the_metric_its_bits() -> None:
    out = torch.randn(4, 6, 256)
    y = torch.randint(256, (4, 6), dtype=torch.uint8)
    want = torch.stack([F.cross_entropy(out[i], y[i].long(), reduction="mean") for i in range(4)])
    torch.testing.assert_close(per_example_loss("categorical", out, y), want)
    problem = Problem(tiny(), "categorical")
    x = torch.randint(256, (5, 16), dtype=torch.uint8)
    loss, bits = evaluate(problem, x, y.new_zeros(5, 16).random_(256), "bits_per_byte")
    assert bits == pytest.approx(loss / math.log(2))


def build(name: str, problem: Problem, **hparams: object) -> object:
    spec = get_method(name)
    hp = {k: v.default for k, v in spec.hparams.items()} | hparams
    if spec.uses_inv_interval:
        hp["inv_interval"] = 10
    return spec.build(problem, hp, MethodContext(None, 0, CPU))


@pytest.mark.parametrize(("name", "lr"), [("adamw", 3e-3), ("sgd", 0.5)])
def test_adamw_and_sgd_learn_a_fixed_batch(name: str, lr: float) -> None:
    x = torch.randint(256, (8, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    method = build(name, Problem(tiny(), "categorical"), lr=lr)
    timer = PhaseTimer(CPU)
    losses = [float(method.step(x, y, timer)) for _ in range(30)]  # type: ignore[attr-defined]
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize(
    ("name", "hparams"),
    [
        ("kfac-fast", {"weight_sharing": "expand", "lr": 0.3}),
        ("kfac-fast", {"weight_sharing": "reduce", "lr": 0.3}),
        ("kfac", {"weight_sharing": "expand", "damping": 1.0}),
        ("skfac", {"weight_sharing": "reduce", "lr": 0.3, "damping": 1.0}),
        ("skfac", {"weight_sharing": "expand", "lr": 0.3, "damping": 1.0}),
    ],
)
def test_curvature_methods_learn_a_fixed_batch_of_sequences(
    name: str, hparams: dict[str, object]
) -> None:
    """K-FAC (both weight-sharing approximations, the full method with its exact-Fisher
    re-scaling on per-token losses) and SKFAC train the transformer; its embeddings and layer
    norms are left to the identity and named so."""
    x = torch.randint(256, (8, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    method = build(name, Problem(tiny(), "categorical"), **hparams)
    timer = PhaseTimer(CPU)
    losses = [float(method.step(x, y, timer)) for _ in range(12)]  # type: ignore[attr-defined]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0]
    identity = method.info()["identity_preconditioner"]  # type: ignore[attr-defined]
    assert {"tokens", "positions", "blocks.0.ln1", "ln_f"} <= set(identity)


def gpt_params(vocab: int, context: int, d: int, depth: int) -> int:
    """Parameters counted by hand, with the output layer tied (no matrix of its own): token and
    position embeddings (V + C)d, per block two LayerNorms 4d, qkv 3d² + 3d, proj d² + d, MLP
    4d² + 4d and 4d² + d; the final LayerNorm 2d."""
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    return (vocab + context) * d + depth * block + 2 * d


def test_gpt2_small_has_124_439_808_parameters_with_its_head_tied() -> None:
    assert gpt_params(50_257, 1024, 768, 12) == 124_439_808  # GPT-2 small (HF's gpt2)
    model = WORKLOADS["gpt2_small"].build_model(torch.Generator().manual_seed(0))
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    assert model.head.weight is model.tokens.weight
    assert len(model.blocks) == 12 and model.blocks[0].attn.heads == 12
    assert "head.weight" not in dict(model.named_parameters())
    mini = WORKLOADS["gpt2_mini"]
    model = mini.build_model(torch.Generator())
    assert sum(p.numel() for p in model.parameters()) == gpt_params(1024, 64, 128, 2)
    data = mini.load_data("synthetic")
    assert data.train_x.dtype == torch.int32 and int(data.train_x.max()) < 1024  # > 256 tokens
    assert model(data.train_x[:3]).shape == (3, 64, 1024)


def test_the_tied_head_is_initialised_once_as_the_embedding() -> None:
    a = byte_gpt(
        context=8,
        width=64,
        depth=1,
        heads=2,
        vocab=300,
        tie_head=True,
        generator=torch.Generator().manual_seed(0),
    )
    b = byte_gpt(
        context=8,
        width=64,
        depth=1,
        heads=2,
        vocab=300,
        tie_head=False,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(a.tokens.weight, b.tokens.weight)  # the same draws, in order
    assert float(a.head.weight.detach().std()) == pytest.approx(0.02, rel=0.03)


def test_nats_per_token_is_the_per_token_loss() -> None:
    problem = Problem(WORKLOADS["gpt2_mini"].build_model(torch.Generator()), "categorical")
    x = torch.randint(1024, (3, 64), dtype=torch.int32)
    y = torch.randint(1024, (3, 64), dtype=torch.int32)
    loss, nats = evaluate(problem, x, y, "nats_per_token")
    assert nats == pytest.approx(loss)
    assert loss == pytest.approx(math.log(1024), rel=0.05)  # near-uniform logits at init


def test_curvature_methods_leave_the_tied_matrix_out_and_update_it_once() -> None:
    """The shared (vocab, width) matrix is no Kronecker-factored layer (no vocab × vocab factor)
    and is updated exactly once per step: with SGD momentum's first step, by −lr·∇ (twice that if
    it were listed twice)."""
    model = WORKLOADS["gpt2_mini"].build_model(torch.Generator().manual_seed(0))
    assert shared_modules(model) == ["tokens", "head"]
    layers, others = find_layers(model)
    assert "head" not in {layer.name for layer in layers}
    assert {"tokens", "head"} <= {name for name, _ in others}
    assert max(max(layer.in_dim, layer.out_dim) for layer in layers) < 1024
    x = torch.randint(1024, (4, 64), generator=torch.Generator().manual_seed(1))
    y = torch.randint(1024, (4, 64), generator=torch.Generator().manual_seed(2))
    for name, hp in [("kfac-fast", {"lr": 0.1}), ("skfac", {"lr": 0.1, "weight_decay": 0.0})]:
        model = WORKLOADS["gpt2_mini"].build_model(torch.Generator().manual_seed(0))
        problem = Problem(model, "categorical")
        problem.loss(problem.forward(x), y).backward()
        grad = model.tokens.weight.grad.clone()
        before = model.tokens.weight.detach().clone()
        method = build(name, problem, **hp)
        method.step(x, y, PhaseTimer(CPU))  # type: ignore[attr-defined]
        step = model.tokens.weight.detach() - before
        torch.testing.assert_close(step, -0.1 * grad, msg=name)
