"""Random tensors with a workload's shapes, for timing-only runs.

Step time depends on shapes, not on values, so a sweep that only measures speed (CI regression
checks, profiling) can run without any data file. Inputs are uniform in [0, 1] so that they are
also valid Bernoulli targets for the autoencoders' cross-entropy loss; labels are uniform.
"""

from __future__ import annotations

from typing import Literal

import torch

from kfacbench.data import Splits


def synthetic_splits(
    input_shape: tuple[int, ...],
    *,
    target: Literal["input", "classes", "tokens"],
    n_train: int,
    n_test: int,
    seed: int,
    num_classes: int = 10,
) -> Splits:
    """Seeded random splits.

    Args:
        input_shape: shape of one example.
        target: ``"input"`` for autoencoders (targets are the inputs, the same tensor object),
            ``"classes"`` for classification (int64 labels in ``0..num_classes-1``),
            ``"tokens"`` for a language model (inputs and next-token targets both ids in
            ``0..num_classes-1`` of shape ``(n, *input_shape)``: uint8 for vocabularies of up
            to 256 tokens, int32 above, e.g. GPT-2's 50,257).
        n_train: training examples.
        n_test: test examples.
        seed: seed of the CPU generator; the same arguments give the same tensors.
        num_classes: number of classes (or the vocabulary) for ``classes`` and ``tokens``.

    Returns:
        Splits with float32 inputs uniform in [0, 1) (token ids for ``tokens``) and source
        ``"synthetic"``.
    """
    gen = torch.Generator().manual_seed(seed)
    if target == "tokens":
        dtype = torch.uint8 if num_classes <= 256 else torch.int32
        train_x, train_y, test_x, test_y = (
            torch.randint(num_classes, (n, *input_shape), generator=gen, dtype=dtype)
            for n in (n_train, n_train, n_test, n_test)
        )
        return Splits(train_x, train_y, test_x, test_y, "synthetic")
    train_x = torch.rand(n_train, *input_shape, generator=gen)
    test_x = torch.rand(n_test, *input_shape, generator=gen)
    if target == "input":
        return Splits(train_x, train_x, test_x, test_x, "synthetic")
    train_y = torch.randint(num_classes, (n_train,), generator=gen)
    test_y = torch.randint(num_classes, (n_test,), generator=gen)
    return Splits(train_x, train_y, test_x, test_y, "synthetic")
