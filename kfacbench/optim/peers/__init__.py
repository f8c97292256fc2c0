"""Other implementations measured on the same training core, one module each.

- :mod:`~kfacbench.optim.peers.asdl`: ASDL's K-FAC and swift K-FAC (SKFAC);
- :mod:`~kfacbench.optim.peers.kaisa`: KAISA (gpauloski/kfac-pytorch);
- :mod:`~kfacbench.optim.peers.modern`: SINGD, Shampoo and SOAP;
- :mod:`~kfacbench.optim.peers.torch_optimizer`: any ``torch.optim`` optimizer as a method (the
  AdamW peer, and the optimizers a suite names by import path).

A peer runs its own code; its adapter drives it through the core's step, so it is timed by the
same clock as kfacbench's presets (DESIGN.md, "One training core"). What the modules share is
here: which preset each peer is measured against, and how a peer's version is recorded.
"""

from __future__ import annotations

import importlib.metadata

COUNTERPARTS = {"asdl-kfac": "kfac-fast", "asdl-skfac": "skfac", "kaisa-kfac": "kfac-fast"}
"""Each peer and the kfacbench preset it is measured against (the report's ratio table)."""


def package_version(dist: str) -> str:
    """The installed version of the distribution ``dist`` (recorded in ``method_info``), or
    ``"unknown"``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
