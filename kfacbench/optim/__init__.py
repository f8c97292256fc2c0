"""Optimizers under test and their registry.

Each entry is a :class:`~kfacbench.optim.base.MethodSpec`; suites name them by key.
"""

from kfacbench.core.method import HParam, Method, MethodContext, MethodSpec
from kfacbench.errors import KfacbenchError
from kfacbench.optim import kfac, sgd, skfac
from kfacbench.optim.peers import asdl, kaisa, modern, torch_optimizer

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        sgd.SPEC,
        *kfac.SPECS,
        *skfac.SPECS,
        *asdl.SPECS,
        *torch_optimizer.SPECS,
        *kaisa.SPECS,
        *modern.SPECS,
    )
}


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``.

    Raises:
        KfacbenchError: unknown name (the message lists the known ones).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise KfacbenchError(f"unknown optimizer {name!r}; known: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "HParam", "Method", "MethodContext", "MethodSpec", "get_method"]
