"""Curvature capture shared by K-FAC and SKFAC: the layers, their inputs and output-gradients.

This is the measuring end of the curvature-estimation half of the kfac-jax split: hooks record
each layer's input ā and the output-gradients g of the Fisher blocks; :mod:`kfacbench.optim.factors`
forms the Kronecker factors from them, and ``kfac.py`` and ``skfac.py`` decide what to keep of them
and how to invert them.

Notation (Martens & Grosse 2015, §2-3): a supported layer computes s = W̄ ā, where ā is its input
with a trailing 1 (the homogeneous coordinate carrying the bias, the last column of W̄) and W̄ has
shape ``(out_dim, in_dim)`` (:func:`grad_matrix`). g = ∂ℓ/∂s is the gradient of the
*per-example* loss ℓ w.r.t. the layer's output. The per-example gradient is ∇W̄ = g āᵀ, and K-FAC
approximates the Fisher block of the layer by Ā ⊗ G with Ā = E[ā āᵀ], G = E[g gᵀ] (§3, the
independence of activations and derivatives).

**Which g.** The Fisher is an expectation over targets y drawn from the model's own predictive
distribution (§5): ``fisher="sampled"`` draws one y per example (the "true" Fisher of the paper, an
unbiased estimate of the exact one), ``"empirical"`` uses the data labels (a different matrix, kept
for comparison), and ``"exact"`` (the "type-2" Fisher of tensorflow/kfac's ``exact`` mode) replaces
the random g by the columns of Jᵀ L, where H = L Lᵀ is the Hessian of the loss w.r.t. the network
output z and J = ∂z/∂s, so that Σ_k g_k g_kᵀ = Jᵀ H J = E_y[g gᵀ] exactly.

**Per-token losses.** A sequence model's per-example loss *averages* P per-token terms
(:func:`~kfacbench.core.problem.loss_terms`). Its gradient is 1/P of the per-term gradients, so
the outer products of sampled or empirical g would under-count the Fisher of the mean loss,
(1/(mP)) Σ_{i,p} J_{i,p}ᵀ H_{i,p} J_{i,p}, by P. Those rows are scaled by √P: curvlinops'
correction for a "mean" loss reduction. The exact Fisher's rows need none, because they come
from the Hessian of the per-example loss itself.

All of it is batched: one forward with hooks, one extra ``torch.autograd.grad`` call w.r.t. the
layer outputs (not the parameters, so no weight gradients are formed), one matmul per factor, and
no host synchronisation. The empirical Fisher needs no extra pass at all: its g are the loss
gradient's own output gradients, m·∂L/∂s for the mean loss L, kept by tensor hooks during the
ordinary backward pass (``Capture.recording(keep_grads=True)``, :meth:`Capture.loss_grads`), as
ASDL's fused statistics pass does. Activations are constants (``detach``), as in every K-FAC
implementation.

Caveat: the rows are per-example only when examples do not interact in the network. BatchNorm in
training mode couples them; like all K-FAC implementations this module ignores that coupling.

Size: the hooks and the three Fishers' output-gradients (sampled, empirical, exact) fill one Capture
and use its private row layout (_grad_rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfacbench.core.problem import Problem, loss_terms, per_example_loss
from kfacbench.errors import KfacbenchError

KFAC_LAYER_TYPES = (nn.Linear, nn.Conv2d)
"""Module types whose Kronecker factors this module can capture (Conv2d: ``groups=1`` and zero
padding only; see :func:`find_layers`)."""

Fisher = Literal["sampled", "empirical", "exact"]
"""How the output-gradients g are obtained; see the module docstring."""


@dataclass(frozen=True)
class Layer:
    """A layer K-FAC preconditions.

    Attributes:
        name: qualified module name from ``model.named_modules()``.
        module: the ``nn.Linear`` or ``nn.Conv2d`` module.
        kind: ``"linear"`` or ``"conv2d"``.
        has_bias: whether the module has a bias (the homogeneous column of W̄).
        in_dim: columns of the gradient matrix W̄ including the bias column:
            ``in_features (+1)`` or ``C_in·kh·kw (+1)``.
        out_dim: rows of W̄: ``out_features`` or ``C_out``.
    """

    name: str
    module: nn.Linear | nn.Conv2d
    kind: Literal["linear", "conv2d"]
    has_bias: bool
    in_dim: int
    out_dim: int

    def params(self) -> list[nn.Parameter]:
        """``[weight]`` or ``[weight, bias]``: the parameters W̄ is made of, in column order."""
        params = [self.module.weight]
        if self.has_bias:
            params.append(cast(Tensor, self.module.bias))
        return cast(list[nn.Parameter], params)


def _is_supported(module: nn.Module) -> bool:
    """Linear layers, and Conv2d layers whose patches F.unfold can extract (zero padding) and
    whose weight is one (C_out, C_in·kh·kw) matrix (``groups=1``)."""
    if not isinstance(module, KFAC_LAYER_TYPES):
        return False
    return not isinstance(module, nn.Conv2d) or (
        module.groups == 1 and module.padding_mode == "zeros"
    )


def shared_modules(model: nn.Module) -> list[str]:
    """Names of the modules owning a parameter that another module owns too: a tied weight,
    such as GPT-2's output layer, whose weight is the token embedding's."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return [
        name
        for name, module in model.named_modules()
        if any(owners[id(p)] > 1 for p in module.parameters(recurse=False))
    ]


def find_layers(model: nn.Module) -> tuple[list[Layer], list[tuple[str, nn.Module]]]:
    """The layers of ``model`` K-FAC can precondition, and the trainable modules it cannot.

    Modules are visited in ``named_modules()`` order (registration order, which is forward order
    for ``nn.Sequential`` chains). Only modules with trainable parameters of their own are
    considered: frozen modules need no update at all.

    A module whose parameter another module shares (:func:`shared_modules`) is not a layer. Its
    Fisher block is not one layer's Ā ⊗ G: the gradient of a tied weight sums the contributions
    of every module using it (GPT-2's output layer and token embedding), and the output layer's
    G alone would be vocab × vocab (50,257² floats, 10 GB for GPT-2). The shared tensor is then
    an other parameter, updated once with the identity preconditioner, as K-FAC at scale leaves
    the embedding and the output layer out (KAISA's GPT-NeoX runs skip both: "K-FAC cannot
    efficiently optimize the embedding layer or the final linear layer", gpauloski/gpt-neox,
    configs/perlmutter/README.md).

    Args:
        model: any module.

    Returns:
        ``(layers, unsupported)``: a :class:`Layer` for every supported module (``nn.Linear``,
        and ``nn.Conv2d`` with ``groups=1`` and ``padding_mode="zeros"``, with all parameters
        trainable), and ``(name, module)`` for every other module with trainable parameters
        (BatchNorm, grouped or reflect-padded convs, Conv1d, a Linear with a frozen weight but a
        trainable bias, a module with a shared parameter, ...). K-FAC gives the latter a plain
        momentum update.
    """
    layers: list[Layer] = []
    unsupported: list[tuple[str, nn.Module]] = []
    shared = set(shared_modules(model))
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not any(p.requires_grad for p in own):
            continue
        supported = _is_supported(module) and name not in shared
        if not (supported and all(p.requires_grad for p in own)):
            unsupported.append((name, module))
            continue
        has_bias = getattr(module, "bias", None) is not None
        if isinstance(module, nn.Conv2d):
            layers.append(
                Layer(
                    name,
                    module,
                    "conv2d",
                    has_bias,
                    module.in_channels * module.kernel_size[0] * module.kernel_size[1] + has_bias,
                    module.out_channels,
                )
            )
        else:
            linear = cast(nn.Linear, module)
            layers.append(
                Layer(
                    name,
                    linear,
                    "linear",
                    has_bias,
                    linear.in_features + has_bias,
                    linear.out_features,
                )
            )
    return layers, unsupported


def other_params(model: nn.Module, layers: Sequence[Layer]) -> list[nn.Parameter]:
    """The trainable parameters of ``model`` that no layer in ``layers`` owns, in model order:
    the ones a Kronecker-factored method leaves to the identity preconditioner."""
    covered = {id(p) for layer in layers for p in layer.params()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in covered]


def grad_matrix(layer: Layer, tensors: Sequence[Tensor] | None = None) -> Tensor:
    """The ``(out_dim, in_dim)`` matrix W̄ = [W | b] of per-parameter tensors.

    Conv weights ``(C_out, C_in, kh, kw)`` are flattened to ``(C_out, C_in·kh·kw)``, the column
    order of the patches of :meth:`Capture.inputs`; the bias is the last column.

    Args:
        layer: the layer.
        tensors: one tensor per parameter, shaped and ordered like ``layer.params()``. ``None``
            reads the parameters' ``.grad`` (a missing gradient, from a layer unused in the last
            backward pass, counts as zero).

    Returns:
        The matrix. Without a bias it is a view of the weight tensor.
    """
    if tensors is None:
        tensors = [p.grad if p.grad is not None else torch.zeros_like(p) for p in layer.params()]
    weight = tensors[0].reshape(layer.out_dim, -1)
    if not layer.has_bias:
        return weight
    return torch.cat([weight, tensors[1].unsqueeze(1)], dim=1)


def split_matrix(layer: Layer, mat: Tensor) -> list[Tensor]:
    """The inverse of :func:`grad_matrix`: per-parameter views of ``mat`` shaped like
    ``layer.params()``."""
    shape = layer.module.weight.shape
    if not layer.has_bias:
        return [mat.reshape(shape)]
    return [mat[:, :-1].reshape(shape), mat[:, -1]]


def as_float(t: Tensor) -> Tensor:
    """float32 for half-precision tensors (autocast), unchanged otherwise (float64 stays)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _same_padding(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """F.pad widths ``(left, right, top, bottom)`` of ``padding="same"``, split as PyTorch's
    convolution does: the odd pixel of an even total goes right/bottom."""
    widths: list[int] = []
    for k, d in zip(reversed(module.kernel_size), reversed(module.dilation), strict=True):
        total = d * (k - 1)
        widths += [total // 2, total - total // 2]
    return widths[0], widths[1], widths[2], widths[3]


def pad_conv_input(module: nn.Conv2d, x: Tensor) -> Tensor:
    """The conv's input ``(..., C_in, H, W)`` with the module's zero padding applied, so that
    patch extraction needs no padding of its own (``"valid"`` pads nothing; ``"same"`` may pad
    asymmetrically)."""
    padding = module.padding
    if isinstance(padding, str):
        return F.pad(x, _same_padding(module)) if padding == "same" else x
    ph, pw = padding
    return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x


def _patch_columns(module: nn.Conv2d, x: Tensor, bias: bool) -> Tensor:
    """im2col of the conv's input ``(m, C_in, H, W)`` laid out as columns: ``(C_in·kh·kw [+1],
    m·T)``, rows in the weight's ``(C_in, kh, kw)`` order, then a row of ones if ``bias``, and
    columns example-major with positions row-major over the output map.

    Written in one strided copy from ``Tensor.unfold`` views (and float32 at once), where
    ``F.unfold`` + transpose + reshape + the ones column cost three: on CPU the factor's
    ``cols @ cols.T`` with this layout is about 2× faster for ResNet-20's first stage.
    """
    x = pad_conv_input(module, x)
    geometry = zip(module.kernel_size, module.dilation, module.stride, strict=True)
    for dim, (k, d, s) in zip((2, 3), geometry, strict=True):
        x = x.unfold(dim, d * (k - 1) + 1, s)[..., ::d]  # views, ending (m, C, H', W', kh, kw)
    m, c, h, w, kh, kw = x.shape
    n_in = c * kh * kw
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    cols = torch.empty(n_in + bias, m * h * w, dtype=dtype, device=x.device)
    cols[:n_in].view(c, kh, kw, m, h, w).copy_(x.permute(1, 4, 5, 0, 2, 3))
    if bias:
        cols[n_in].fill_(1.0)
    return cols


def _grad_rows(layer: Layer, grad: Tensor) -> Tensor:
    """Output-gradient rows ``(rows, out_dim)`` in the row order of :meth:`Capture.inputs`:
    conv maps ``(..., C_out, H', W')`` become one row per example and position."""
    grad = as_float(grad)
    if layer.kind == "conv2d":
        grad = grad.movedim(-3, -1)
    return grad.reshape(-1, layer.out_dim)


_Hook = Callable[[nn.Module, tuple[Any, ...], Tensor], None]


class Capture:
    """Records, for each layer, its input (for ā) and its output s (to take g = ∂L/∂s later).

    Hooks exist only inside :meth:`recording`, so steps that take no statistics pay nothing.
    K-FAC's use per step::

        with capture.recording():            # forward hooks active only inside
            out = problem.forward(x)
        loss = problem.loss(out, y)
        gs = output_grads(capture, layers, problem, out, y)   # retains the graph
        loss.backward()
        stats = [factors(l, capture.inputs(l), g, len(x)) for l, g in zip(layers, gs)]
        capture.clear()                      # the outputs hold the forward graph alive

    With ``recording(keep_grads=True)`` the gradients reaching each output during the loss's own
    backward pass are kept as well (:meth:`loss_grads`): the empirical Fisher's g at no extra
    pass.

    Each layer must be called exactly once per recorded forward pass (no weight sharing), and its
    output must not be modified in place afterwards (``nn.ReLU(inplace=True)`` right after it):
    g would then be the gradient w.r.t. the modified tensor. Both are detected and raise.
    """

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.layers = list(layers)
        self._slot = {id(layer.module): i for i, layer in enumerate(self.layers)}
        self._hooks = [self._make_hook(i) for i in range(len(self.layers))]
        self.clear()

    def _make_hook(self, i: int) -> _Hook:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            if self._outputs[i] is not None:
                raise KfacbenchError(
                    f"layer {self.layers[i].name!r} was called twice in one recorded forward pass;"
                    " K-FAC's curvature capture needs one call per layer (no weight sharing)"
                )
            self._inputs[i] = args[0].detach()  # ā is a constant of the Fisher (no graph)
            self._outputs[i] = output  # kept in the graph: g is taken w.r.t. it
            self._versions[i] = output._version
            if self._keep_grads and output.requires_grad:
                output.register_hook(self._make_grad_hook(i))

        return hook

    def _make_grad_hook(self, i: int) -> Callable[[Tensor], None]:
        def keep(grad: Tensor) -> None:
            self._grads[i] = grad

        return keep

    @contextmanager
    def recording(self, enabled: bool = True, *, keep_grads: bool = False) -> Iterator[None]:
        """Record the layers during the forward passes run inside the block.

        Entering drops any previous record. With ``enabled=False`` no hook is registered and the
        block runs exactly as without this context. With ``keep_grads`` the first backward pass
        through each recorded output leaves its gradient for :meth:`loss_grads`.
        """
        self.clear()
        self._keep_grads = enabled and keep_grads
        pairs = zip(self.layers, self._hooks, strict=True) if enabled else ()
        handles = [layer.module.register_forward_hook(hook) for layer, hook in pairs]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _index(self, layer: Layer) -> int:
        i = self._slot.get(id(layer.module))
        if i is None:
            raise KfacbenchError(f"layer {layer.name!r} is not one of this capture's layers")
        if self._outputs[i] is None:
            raise KfacbenchError(
                f"layer {layer.name!r} was not called in the recorded forward pass"
            )
        return i

    def inputs(self, layer: Layer) -> Tensor:
        """The rows ā of ``layer``, float32 (or float64), shape ``(rows, layer.in_dim)``.

        Linear: one row per example (inputs with extra leading dimensions give one row per
        example and position). Conv2d: one im2col patch per example and output position,
        ``(m·T, C_in·kh·kw)`` with the rows example-major and positions row-major over the
        output map, extracted with the layer's own kernel size, stride, padding and dilation.
        A ones column is appended when the layer has a bias. Computed on each call; conv rows
        are the transpose of a contiguous ``(in_dim, m·T)`` matrix (:func:`_patch_columns`).
        """
        x = cast(Tensor, self._inputs[self._index(layer)])
        if layer.kind == "conv2d":
            module = cast(nn.Conv2d, layer.module)
            return _patch_columns(module, x, layer.has_bias).T  # a view; mm reads it as is
        rows = as_float(x)
        if layer.has_bias:
            rows = F.pad(rows, (0, 1), value=1.0)
        return rows.reshape(-1, layer.in_dim)

    def raw_input(self, layer: Layer) -> Tensor:
        """The recorded (detached) input tensor of ``layer`` as it entered the module, before
        patch extraction: for reductions that never form the im2col matrix (SKFAC)."""
        return cast(Tensor, self._inputs[self._index(layer)])

    def outputs(self, layers: Sequence[Layer] | None = None) -> list[Tensor]:
        """The recorded outputs s (still in the autograd graph) of ``layers`` (default: all of this
        capture's layers), in that order.

        Raises:
            KfacbenchError: a layer was not called, or its output was modified in place.
        """
        result = []
        for layer in self.layers if layers is None else layers:
            i = self._index(layer)
            output = cast(Tensor, self._outputs[i])
            if output._version != self._versions[i]:
                raise KfacbenchError(
                    f"the output of layer {layer.name!r} was modified in place after the layer"
                    " (an inplace=True activation?); K-FAC needs the layer's own output: make that"
                    " operation out of place"
                )
            result.append(output)
        return result

    def loss_grads(
        self, layers: Sequence[Layer], per_example: int, *, as_rows: bool = True
    ) -> list[Tensor]:
        """The empirical Fisher's output-gradient rows, from the loss's own backward pass.

        The loss is the *mean* over ``per_example`` examples, so ∂L/∂s_i = ∂ℓ_i/∂s_i / m and the
        kept gradients times m are the per-example rows :func:`output_grads` returns for
        ``fisher="empirical"`` (equal up to rounding), without its second backward pass.

        Args:
            layers: the layers wanted, in the order returned.
            per_example: m, the number of examples the loss averaged over.
            as_rows: as in :func:`output_grads`.

        Raises:
            KfacbenchError: the forward pass was not recorded with ``keep_grads``, or no backward
                pass has run since (a layer that does not reach the loss gets zeros).
        """
        if not self._keep_grads:
            raise KfacbenchError("loss_grads needs a forward pass recorded with keep_grads=True")
        outputs = self.outputs(layers)
        grads = [self._grads[self._index(layer)] for layer in layers]
        if all(grad is None for grad in grads):
            raise KfacbenchError("loss_grads: no backward pass reached the recorded outputs")
        result = []
        for layer, output, grad in zip(layers, outputs, grads, strict=True):
            g = as_float(torch.zeros_like(output) if grad is None else grad * per_example)
            result.append(_grad_rows(layer, g) if as_rows else g)
        return result

    def clear(self) -> None:
        """Drop every recorded tensor, so no memory (nor graph) is kept between steps."""
        n = len(self.layers)
        self._inputs: list[Tensor | None] = [None] * n
        self._outputs: list[Tensor | None] = [None] * n
        self._grads: list[Tensor | None] = [None] * n
        self._versions: list[int] = [0] * n
        self._keep_grads = False


def output_grads(
    capture: Capture,
    layers: Sequence[Layer],
    problem: Problem,
    output: Tensor,
    target: Tensor | None = None,
    *,
    fisher: Literal["sampled", "empirical"] = "sampled",
    generator: torch.Generator | None = None,
    retain_graph: bool = True,
    as_rows: bool = True,
) -> list[Tensor]:
    """The output-gradient rows g of each layer, for the Fisher's G factor.

    One ``torch.autograd.grad`` of the *sum* of per-example losses w.r.t. the recorded layer
    outputs: row i is ∂ℓ_i/∂s_i, the per-example gradient (m times the mean-loss gradient,
    Martens & Grosse 2015, §5), so E over rows of g gᵀ is the per-example Fisher factor.

    Args:
        capture: the capture that recorded the forward pass producing ``output``.
        layers: the layers wanted (the capture's layers or a subset), in the order returned.
        problem: gives the loss and the output distribution.
        output: the network output of the recorded forward pass (in the graph).
        target: the data targets; needed for ``fisher="empirical"`` only.
        fisher: ``"sampled"``: targets drawn from the model's predictive distribution
            (``problem.sample_targets``), the true Fisher of the paper; ``"empirical"``: the data
            targets.
        generator: the random source of the sampled targets.
        retain_graph: keep the forward graph for a later backward pass (the loss gradient).
        as_rows: reshape each gradient to rows (below); ``False`` returns it shaped like the
            layer's output (float32), for callers that reduce over positions first (SKFAC).

    Returns:
        Per layer, float32 rows ``(m, out_dim)`` (Linear) or ``(m·T, out_dim)`` (Conv2d, rows
        ordered like :meth:`Capture.inputs`). A layer that does not reach the loss gets zeros.
    """
    if fisher == "sampled":
        target = problem.sample_targets(output, generator)
    elif fisher != "empirical":
        raise ValueError(f"unknown fisher {fisher!r} for output_grads; known: sampled, empirical")
    elif target is None:
        raise ValueError("the empirical Fisher needs the data targets")
    loss = per_example_loss(problem.distribution, output, target).sum()
    grads = torch.autograd.grad(
        loss,
        capture.outputs(layers),
        retain_graph=retain_graph,
        allow_unused=True,
        materialize_grads=True,
    )
    scaled = per_term(grads, problem, output)
    if not as_rows:
        return [as_float(g) for g in scaled]
    return [_grad_rows(layer, g) for layer, g in zip(layers, scaled, strict=True)]


def per_term(grads: Sequence[Tensor], problem: Problem, output: Tensor) -> list[Tensor]:
    """Gradients of per-example losses scaled by √P, P the per-token terms each averages
    (:func:`~kfacbench.core.problem.loss_terms`; see "Per-token losses" in the module
    docstring); unchanged when P = 1."""
    terms = loss_terms(problem.distribution, output)
    if terms == 1:
        return list(grads)
    return [g * math.sqrt(terms) for g in grads]


def fisher_output_grads(
    capture: Capture,
    layers: Sequence[Layer],
    problem: Problem,
    output: Tensor,
    fisher: Fisher,
    generator: torch.Generator | None = None,
    *,
    as_rows: bool = True,
) -> list[Tensor]:
    """The output-gradient rows of ``fisher`` for an optimizer's step, after the loss's own
    backward pass: ``empirical`` from that pass (:meth:`Capture.loss_grads`; the forward pass
    recorded with ``keep_grads``), ``sampled`` by one more pass and ``exact`` by K more (both need
    the graph retained). The graph is released afterwards. ``as_rows=False`` (gradient maps, as
    :func:`output_grads`) is for ``sampled`` and ``empirical``."""
    if fisher == "empirical":
        return per_term(
            capture.loss_grads(layers, output.shape[0], as_rows=as_rows), problem, output
        )
    if fisher == "exact":
        if not as_rows:
            raise ValueError("the exact Fisher's output gradients come as rows only")
        return exact_output_grads(capture, layers, problem, output, retain_graph=False)
    return output_grads(
        capture,
        layers,
        problem,
        output,
        fisher="sampled",
        generator=generator,
        retain_graph=False,
        as_rows=as_rows,
    )


def _loss_hessian_sqrt(problem: Problem, output: Tensor) -> Tensor:
    """Columns of L with L Lᵀ = H, the Hessian of the per-example loss w.r.t. the output, as a
    batch ``(K, m, K)``: entry ``[k, i]`` is column k of example i's L.

    Bernoulli: H = diag(p(1−p)), L = diag(√(p(1−p))). Gaussian (unit variance): H = L = I.
    Categorical: H = diag(p) − p pᵀ and L = diag(√p) − p √pᵀ (L Lᵀ = H because Σ_k p_k = 1), whose
    column k is √p_k (e_k − p). Categorical sequences ``(m, P, V)`` with the per-token mean
    loss: H is block diagonal over positions, each block (diag(p_t) − p_t p_tᵀ)/P, so column
    (t, k) is √p_{t,k} (e_k − p_t)/√P at position t and zero elsewhere (K = P·V).
    """
    m = output.shape[0]
    z = output.detach().reshape(m, -1)
    k = z.shape[1]
    eye = torch.eye(k, dtype=z.dtype, device=z.device).unsqueeze(1)  # (K, 1, K): e_k
    if problem.distribution == "bernoulli":
        return eye * (torch.sigmoid(z) * torch.sigmoid(-z)).sqrt()  # p(1−p), stable in the tails
    if problem.distribution == "gaussian":
        return eye.expand(k, m, k)
    if output.dim() > 2:
        p = torch.softmax(output.detach().reshape(m, -1, output.shape[-1]), dim=-1)  # (m, P, V)
        positions, classes = p.shape[1:]
        onehot = torch.eye(classes, dtype=p.dtype, device=p.device)[:, None, None, :]
        block = (onehot - p) * p.permute(2, 0, 1).sqrt().unsqueeze(-1)  # (V, m, P, V)
        diag = torch.eye(positions, dtype=p.dtype, device=p.device)[:, None, None, :, None]
        cols = diag * block / math.sqrt(positions)  # (P, V, m, P, V): zero off position t
        return cols.reshape(k, m, k)
    p = torch.softmax(z, dim=-1)
    return (eye - p) * p.sqrt().T.unsqueeze(-1)


def exact_output_grads(
    capture: Capture,
    layers: Sequence[Layer],
    problem: Problem,
    output: Tensor,
    *,
    max_outputs: int = 64,
    retain_graph: bool = True,
) -> list[Tensor]:
    """Output-gradient rows of the exact ("type-2") Fisher: g_{k,i} = J_iᵀ L_i[:, k].

    With H_i = L_i L_iᵀ the loss Hessian w.r.t. example i's output z_i (see
    :func:`_loss_hessian_sqrt`) and J_i = ∂z_i/∂s_i, the K vectors g_{k,i} satisfy
    Σ_k g_{k,i} g_{k,i}ᵀ = J_iᵀ H_i J_i = E_{y~p(y|x_i)}[g_i g_iᵀ]: the sampled Fisher's G without
    its sampling noise. All K columns are pushed back in one vectorised
    ``torch.autograd.grad(..., is_grads_batched=True)`` call, costing about K backward passes.

    Normalisation: the rows of all k are stacked, so pass ``batch_size = m`` to
    :func:`~kfacbench.optim.factors.factors`;
    G = (1/m) Σ_{k,i} g_{k,i} g_{k,i}ᵀ = (1/m) Σ_i J_iᵀ H_i J_i, the per-example exact factor
    (for a Conv2d layer J_i covers every output position and each g_{k,i} has T rows, summed as
    in the sampled case).

    Args:
        capture: the capture that recorded the forward pass producing ``output``.
        layers: the layers wanted, in the order returned.
        problem: gives the output distribution.
        output: the network output of the recorded forward pass, ``(m, K)`` or ``(m, ...)``
            (Bernoulli/Gaussian outputs are flattened to K per example).
        max_outputs: refuse larger K (the cost grows linearly with K).
        retain_graph: keep the forward graph for a later backward pass.

    Returns:
        Per layer, float32 rows ``(K·m, out_dim)`` (Linear) or ``(K·m·T, out_dim)`` (Conv2d),
        k-major, each block of m(·T) rows ordered like :meth:`Capture.inputs`.

    Raises:
        KfacbenchError: K > ``max_outputs``.
    """
    k = output[0].numel()
    if k > max_outputs:
        raise KfacbenchError(
            f"the exact Fisher needs one backward pass per network output, and this model has"
            f" {k} outputs per example (more than max_outputs = {max_outputs}); use"
            ' fisher = "sampled"'
        )
    columns = _loss_hessian_sqrt(problem, output).reshape(k, *output.shape)
    grads = torch.autograd.grad(
        output,
        capture.outputs(layers),
        grad_outputs=columns,
        retain_graph=retain_graph,
        is_grads_batched=True,
    )
    return [_grad_rows(layer, g) for layer, g in zip(layers, grads, strict=True)]
