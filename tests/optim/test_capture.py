"""Layer capture against brute force: which layers are found, the gradient matrices, the
recorded inputs and the output gradients of each Fisher (optim/capture.py)."""

from __future__ import annotations

import pytest
import torch
from shared_nets import DISTRIBUTIONS, conv_net, data, mlp, record
from torch import Tensor, nn

from kfacbench.core.problem import Distribution, Problem
from kfacbench.errors import KfacbenchError
from kfacbench.optim.capture import (
    Capture,
    exact_output_grads,
    find_layers,
    grad_matrix,
    output_grads,
    split_matrix,
)
from kfacbench.workloads.nets import cifar_resnet

# ---------------------------------------------------------------------------------------------
# Output gradients


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_sampled_fisher_uses_targets_from_the_generator(distribution: Distribution) -> None:
    problem = Problem(mlp((4, 3, 2)), distribution)
    x, _ = data(distribution, 16, 4, 2)
    layers, capture, out = record(problem, x)

    def sampled(seed: int) -> list[Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return output_grads(capture, layers, problem, out, None, generator=gen)

    targets = problem.sample_targets(out, torch.Generator().manual_seed(3))
    empirical = output_grads(capture, layers, problem, out, targets, fisher="empirical")
    for first, again, reference, other in zip(
        sampled(3), sampled(3), empirical, sampled(4), strict=True
    ):
        torch.testing.assert_close(first, again, rtol=0, atol=0)
        torch.testing.assert_close(first, reference)
        assert not torch.allclose(first, other)


def test_output_grads_needs_targets_for_the_empirical_fisher() -> None:
    problem = Problem(mlp((4, 3, 2)), "gaussian")
    layers, capture, out = record(problem, torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="targets"):
        output_grads(capture, layers, problem, out, None, fisher="empirical")


def test_exact_fisher_refuses_many_outputs() -> None:
    problem = Problem(mlp((4, 3, 65)), "bernoulli")
    layers, capture, out = record(problem, torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(KfacbenchError, match=r"65 outputs.*sampled"):
        exact_output_grads(capture, layers, problem, out)
    assert len(exact_output_grads(capture, layers, problem, out, max_outputs=65)) == 2


# ---------------------------------------------------------------------------------------------
# Layers, gradient matrices, recording


def test_grad_matrix_split_matrix_round_trip() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, bias=True),
        nn.Conv2d(3, 4, 2, bias=False),
        nn.Flatten(),
        nn.Linear(16, 5),
        nn.Linear(5, 2, bias=False),
    )
    layers, unsupported = find_layers(model)
    assert unsupported == []
    out = model(torch.randn(2, 2, 5, 5))
    out.sum().backward()
    for layer in layers:
        params = layer.params()
        assert len(params) == 1 + layer.has_bias
        mat = grad_matrix(layer)
        assert mat.shape == (layer.out_dim, layer.in_dim)
        if layer.has_bias:
            torch.testing.assert_close(mat[:, -1], params[1].grad)
        for part, p in zip(split_matrix(layer, mat), params, strict=True):
            torch.testing.assert_close(part, p.grad)
        values = [torch.randn_like(p) for p in params]
        for part, v in zip(split_matrix(layer, grad_matrix(layer, values)), values, strict=True):
            torch.testing.assert_close(part, v)


def test_find_layers_on_a_cifar_resnet() -> None:
    model = cifar_resnet(20)
    layers, unsupported = find_layers(model)
    convs = [n for n, mod in model.named_modules() if isinstance(mod, nn.Conv2d)]
    norms = [n for n, mod in model.named_modules() if isinstance(mod, nn.BatchNorm2d)]
    assert [layer.name for layer in layers] == [*convs, "fc"]
    assert len(convs) == 19
    assert [name for name, _ in unsupported] == norms
    first = layers[0]
    assert (first.kind, first.has_bias, first.in_dim, first.out_dim) == ("conv2d", False, 27, 16)
    assert (layers[-1].kind, layers[-1].in_dim, layers[-1].out_dim) == ("linear", 65, 10)


def test_find_layers_lists_what_it_cannot_precondition() -> None:
    frozen = nn.Linear(2, 2)
    frozen.weight.requires_grad_(False)
    all_frozen = nn.Linear(2, 2).requires_grad_(False)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv1d(2, 2, 3),
        frozen,
        all_frozen,
        nn.Linear(2, 2),
    )
    layers, unsupported = find_layers(model)
    assert [layer.name for layer in layers] == ["5"]
    assert [name for name, _ in unsupported] == ["0", "1", "2", "3"]


def test_recording_adds_hooks_only_when_enabled() -> None:
    model = mlp((4, 3, 2))
    layers, _ = find_layers(model)
    capture = Capture(layers)
    x = torch.randn(2, 4, dtype=torch.float64)
    with capture.recording(enabled=False):
        assert all(not layer.module._forward_hooks for layer in layers)
        model(x)
    with pytest.raises(KfacbenchError, match="not called"):
        capture.inputs(layers[0])
    with capture.recording():
        assert all(len(layer.module._forward_hooks) == 1 for layer in layers)
        model(x)
    assert all(not layer.module._forward_hooks for layer in layers)
    assert capture.inputs(layers[0]).shape == (2, 5)
    capture.clear()
    with pytest.raises(KfacbenchError, match="not called"):
        capture.outputs()


def test_capture_detects_inplace_outputs_and_repeated_calls() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(inplace=True), nn.Linear(3, 2))
    layers, _ = find_layers(model)
    capture = Capture(layers)
    with capture.recording():
        model(torch.randn(2, 4))
    with pytest.raises(KfacbenchError, match=r"'0'.*in place"):
        capture.outputs()
    shared = nn.Linear(3, 3)
    twice = Capture(find_layers(shared)[0])
    with pytest.raises(KfacbenchError, match="called twice"), twice.recording():
        shared(shared(torch.randn(2, 3)))
    assert not shared._forward_hooks


class Branch(nn.Module):
    """A conv net with a Linear layer whose output never reaches the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = conv_net(kernel_size=3, stride=2, padding=1)
        self.dead = nn.Linear(2, 2).double()

    def forward(self, x: Tensor) -> Tensor:
        self.dead(x[:, 0, 0, :2])
        return self.net(x)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_loss_grads_are_the_empirical_output_grads_without_a_second_pass(
    distribution: Distribution,
) -> None:
    """m·∂L/∂s kept from the loss's own backward = the per-example rows of an explicit pass."""
    model = Branch()
    problem = Problem(model, distribution)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, 2, 7, 7, generator=gen, dtype=torch.float64)
    y = {
        "categorical": torch.randint(0, 3, (5,), generator=gen),
        "bernoulli": torch.randint(0, 2, (5, 3), generator=gen).double(),
        "gaussian": torch.randn(5, 3, generator=gen, dtype=torch.float64),
    }[distribution]
    layers, _ = find_layers(model)
    capture = Capture(layers)
    with capture.recording(keep_grads=True):
        out = problem.forward(x)
    with pytest.raises(KfacbenchError, match="no backward pass"):
        capture.loss_grads(layers, 5)
    want = output_grads(capture, layers, problem, out, y, fisher="empirical")
    want_maps = output_grads(capture, layers, problem, out, y, fisher="empirical", as_rows=False)
    problem.loss(out, y).backward()
    got = capture.loss_grads(layers, 5)
    got_maps = capture.loss_grads(layers, 5, as_rows=False)
    assert [layer.name for layer in layers] == ["net.0", "net.3", "dead"]
    assert not got[2].any()  # the dead layer: zeros, like output_grads
    for g, w in zip(got + got_maps, want + want_maps, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w)
    with capture.recording():
        problem.forward(x)
    with pytest.raises(KfacbenchError, match="keep_grads"):
        capture.loss_grads(layers, 5)
