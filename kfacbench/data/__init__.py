"""Data sets of the benchmark workloads, as whole in-memory tensors.

Every loader returns :class:`Splits`: the complete train and test sets as CPU tensors, which the
runner moves to the device once, so minibatches are drawn on the device and the suite times
optimizers rather than input pipelines. Nothing is downloaded: real data sets are read from
their official files (found through ``--data-dir``, ``$KFACBENCH_DATA`` and a few standard
folders, see :mod:`kfacbench.data.files`); CURVES and FACES are regenerated and cached.

Modules: :mod:`~kfacbench.data.curves` (generated CURVES), :mod:`~kfacbench.data.idx` (MNIST and
Fashion-MNIST IDX files), :mod:`~kfacbench.data.cifar` (CIFAR-10 python batches),
:mod:`~kfacbench.data.faces` (FACES derived from the Olivetti faces) and
:mod:`~kfacbench.data.synthetic` (random tensors for timing-only runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Splits:
    """A data set's train and test splits.

    Attributes:
        train_x: float32 inputs on the CPU, shape ``(N, *input_shape)``.
        train_y: targets: for autoencoders the *same tensor object* as ``train_x`` (so moving
            the splits to a device copies the data once), for classification int64 labels
            ``(N,)``.
        test_x: test inputs, like ``train_x``.
        test_y: test targets, like ``train_y``.
        source: which data were used, recorded with the results, e.g. ``"real:mnist"``,
            ``"generated:curves-v1(seed=0)"``, ``"derived:olivetti-faces-v1(seed=0)"`` or
            ``"synthetic"``.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str


# The loaders import Splits from this module, so they are imported after it is defined.
from kfacbench.data.cifar import cifar10_splits, load_cifar10_arrays  # noqa: E402
from kfacbench.data.curves import load_curves, render_curves  # noqa: E402
from kfacbench.data.faces import build_faces, load_faces, load_olivetti  # noqa: E402
from kfacbench.data.idx import (  # noqa: E402
    load_idx_dataset,
    mnist_autoencoder_splits,
    mnist_classification_splits,
    read_idx,
)
from kfacbench.data.synthetic import synthetic_splits  # noqa: E402

__all__ = [
    "Splits",
    "build_faces",
    "cifar10_splits",
    "load_cifar10_arrays",
    "load_curves",
    "load_faces",
    "load_idx_dataset",
    "load_olivetti",
    "mnist_autoencoder_splits",
    "mnist_classification_splits",
    "read_idx",
    "render_curves",
    "synthetic_splits",
]
