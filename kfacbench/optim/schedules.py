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
