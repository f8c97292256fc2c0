"""Learning-rate schedules as pure functions of the step (host floats, no device work)."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "step", "cosine")


def scheduled_lr(
    base: float,
    step: int,
    *,
    schedule: str,
    total_steps: int | None,
    warmup_steps: int = 0,
    decay: float = 0.1,
) -> float:
    """Learning rate at 0-based ``step``.

    Args:
        base: peak learning rate.
        step: steps taken so far.
        schedule: ``constant``; ``step`` (multiply by ``decay`` at 50% and again at 75% of the
            horizon, the usual CIFAR ResNet recipe); ``cosine`` (half-cosine from ``base`` to 0).
        total_steps: horizon; required by ``step`` and ``cosine``.
        warmup_steps: linear warm-up from ``base / warmup_steps`` over this many steps.
        decay: factor of the ``step`` schedule.

    Raises:
        ValueError: unknown schedule, or a schedule that needs a horizon without one.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    if warmup_steps and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if schedule == "constant":
        return base
    if total_steps is None:
        raise ValueError(f"lr schedule {schedule!r} needs a step budget (max_steps)")
    if schedule == "step":
        frac = step / total_steps
        return base * (decay ** (int(frac >= 0.5) + int(frac >= 0.75)))
    t = min(step, total_steps) / total_steps
    return base * 0.5 * (1.0 + math.cos(math.pi * t))


def growing_batch_size(step: int, base: int, n: int, full_at: int) -> int:
    """Minibatch size m_k = min(m₁ exp((k − 1)/b), n) of K-FAC's experiments (§13).

    b is chosen so that the whole training set (n examples) is used from iteration ``full_at``
    on (500 in tensorflow/kfac's autoencoder example); k = step + 1. ``full_at <= 1`` or
    ``base >= n`` means the full set from the start.
    """
    if base >= n or full_at <= 1:
        return n
    rate = math.log(n / base) / (full_at - 1)
    return min(n, round(base * math.exp(step * rate)))
