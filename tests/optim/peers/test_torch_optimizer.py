"""A torch.optim optimizer as a method: the AdamW peer trains through the core with the phases
forward, backward and update and records torch's version."""

from __future__ import annotations

import torch
from shared_peers import losses


def test_adamw_reduces_the_loss() -> None:
    first, last, phases = losses("adamw", lr=0.01)
    assert last < 0.8 * first
    assert set(phases) == {"forward", "backward", "update", "step", "info"}
    assert phases["info"]["version"] == torch.__version__
