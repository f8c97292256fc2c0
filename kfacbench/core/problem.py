"""Problem: a model with its loss as the negative log-likelihood of an output distribution.

K-FAC's Fisher is defined by the model's predictive distribution (Martens & Grosse 2015, §2):
the "true" Fisher draws targets from it, the empirical Fisher uses the data labels. Writing the
loss as the NLL of a named distribution gives both the training objective and the sampler from one
place, so every optimizer trains the same objective and K-FAC can sample targets for its curvature
backward pass.

Losses are summed over output dimensions and averaged over examples (the convention of the
autoencoder experiments: reconstruction error per example).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Distribution = Literal["bernoulli", "gaussian", "categorical"]
"""Output distribution of a problem.

- ``bernoulli``: outputs are logits of independent Bernoulli pixels (binary cross-entropy).
- ``gaussian``: outputs are the mean of a unit-variance Gaussian (half squared error).
- ``categorical``: outputs are class logits (softmax cross-entropy). Outputs of shape
  ``(batch, positions, classes)`` with targets ``(batch, positions)`` are sequences (a language
  model): an example's NLL is the mean over its positions, the per-token loss.
"""

AmpMode = Literal["off", "bf16"]


@dataclass
class Problem:
    """The model under training and the distribution its outputs parametrise.

    Attributes:
        model: the network; its outputs are the distribution's natural parameters (logits or mean).
        distribution: see :data:`Distribution`.
        amp: autocast mode of the forward pass (``off`` keeps float32).
        wrapped: the module training-mode forward passes go through when it is not ``model``
            itself: DistributedDataParallel around ``model`` in a data-parallel run, so the
            backward pass all-reduces the gradient. Eval-mode passes (no backward) use ``model``.
    """

    model: nn.Module
    distribution: Distribution
    amp: AmpMode = "off"
    wrapped: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Model outputs in float32 (autocast only around the model call when ``amp`` is on)."""
        module = self.wrapped if self.wrapped is not None and self.model.training else self.model
        if self.amp == "off":
            return module(x)
        with self.precision(x.device):
            out = module(x)
        return out.float()

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over examples of the per-example negative log-likelihood (up to constants)."""
        return per_example_loss(self.distribution, output, target).mean()

    def sample_targets(
        self, output: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Targets drawn from the model's own predictive distribution (for the true Fisher).

        The draw is detached: the Fisher's expectation is over y ~ p(y|x, θ) with θ held fixed.
        """
        out = output.detach()
        if self.distribution == "gaussian":
            noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
            return out + noise
        # A diverging run has NaN or infinite outputs. CUDA's samplers assert on such
        # probabilities on the device, which loses the CUDA context for every later cell; the
        # loop records the run as diverged at its next read-back, so sample from finite values.
        out = torch.nan_to_num(out, nan=0.0)
        if self.distribution == "bernoulli":
            return torch.bernoulli(torch.sigmoid(out), generator=generator)
        # Gumbel-max: argmax(logits + G), G ~ Gumbel(0, 1), is a draw of softmax(logits). Unlike
        # torch.multinomial it has no host-side input checks (no sync) and no NaN assert.
        u = torch.rand(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))
        return torch.argmax(out + gumbel, dim=-1)

    def precision(self, device: torch.device) -> AbstractContextManager[object]:
        """The autocast context of this problem's forward pass (a no-op when ``amp`` is off), for
        the extra forward passes an optimizer makes, so that they see the same precision as the
        training forward (K-FAC's ρ compares losses from both)."""
        if self.amp == "off":
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def per_example_loss(
    distribution: Distribution, output: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Per-example NLL, shape ``(batch,)``."""
    if distribution == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(output, target, reduction="none")
        return nll.flatten(1).sum(1)
    if distribution == "gaussian":
        return 0.5 * (output - target).pow(2).flatten(1).sum(1)
    if output.dim() > 2:  # sequences: the per-token NLL, averaged over positions
        nll = F.cross_entropy(output.flatten(0, -2), target.flatten().long(), reduction="none")
        return nll.view(target.shape).flatten(1).mean(1)
    return F.cross_entropy(output, target, reduction="none")


def loss_terms(distribution: Distribution, output: torch.Tensor) -> int:
    """P, the number of likelihood terms each example's loss *averages* over: the positions of a
    sequence's per-token loss, 1 otherwise (Bernoulli pixels and Gaussian outputs are summed).

    Curvature methods need it: the gradient of a mean of P terms is 1/P of the per-term
    gradients, so its outer product under-counts the Fisher of the mean loss by a factor P
    (Eschenhagen et al. 2023, the "mean" reduction's correction).
    """
    if distribution == "categorical" and output.dim() > 2:
        return output.shape[1:-1].numel()
    return 1


def prediction(distribution: Distribution, output: torch.Tensor) -> torch.Tensor:
    """The model's point prediction: pixel means for autoencoders, class ids for classifiers."""
    if distribution == "bernoulli":
        return torch.sigmoid(output)
    if distribution == "gaussian":
        return output
    return output.argmax(dim=-1)
