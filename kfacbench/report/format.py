"""How a report writes numbers: the same units and rounding in every table, figure and claim."""

from __future__ import annotations


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def seconds(value: float) -> str:
    """Seconds for a reader: 3 significant digits (30.0 beside 29.3, not 30), whole seconds
    from 100 s, no exponent notation for the times a benchmark meets."""
    if abs(value) >= 99.95:  # rounds to 3 digits or more: whole seconds
        return f"{value:.0f} s"
    return f"{value:#.3g} s" if abs(value) >= 0.01 else f"{value:.2g} s"
