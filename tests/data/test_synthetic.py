"""Synthetic timing-only data: shapes, dtypes, value ranges, determinism."""

from __future__ import annotations

import torch

from kfacbench.data.synthetic import synthetic_splits


def test_autoencoder_targets_are_inputs() -> None:
    data = synthetic_splits((784,), target="input", n_train=30, n_test=20, seed=0)
    assert data.train_x.shape == (30, 784) and data.test_x.shape == (20, 784)
    assert data.train_x.dtype == torch.float32
    assert data.train_y is data.train_x and data.test_y is data.test_x
    assert data.train_x.min() >= 0 and data.train_x.max() < 1
    assert data.source == "synthetic"


def test_classification_labels() -> None:
    data = synthetic_splits(
        (3, 8, 8), target="classes", n_train=500, n_test=40, seed=0, num_classes=7
    )
    assert data.train_x.shape == (500, 3, 8, 8) and data.test_x.shape == (40, 3, 8, 8)
    assert data.train_y.shape == (500,) and data.test_y.shape == (40,)
    assert data.train_y.dtype == torch.int64
    assert set(data.train_y.tolist()) == set(range(7))


def test_deterministic_and_seed_dependent() -> None:
    a = synthetic_splits((5,), target="classes", n_train=10, n_test=10, seed=1)
    b = synthetic_splits((5,), target="classes", n_train=10, n_test=10, seed=1)
    c = synthetic_splits((5,), target="classes", n_train=10, n_test=10, seed=2)
    for x, y in zip(
        (a.train_x, a.train_y, a.test_x, a.test_y),
        (b.train_x, b.train_y, b.test_x, b.test_y),
        strict=True,
    ):
        assert torch.equal(x, y)
    assert not torch.equal(a.train_x, c.train_x)
    assert not torch.equal(a.train_x, a.test_x)
