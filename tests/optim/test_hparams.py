"""Each built-in method's hyperparameter defaults are written once, in the signature of what
builds it (issue 29): :func:`~kfacbench.core.method.hparams_from` reads them from there, and a
preset (``kfac-fast``, ``asdl-skfac``, ...) states only the values it changes.

Every module of :mod:`kfacbench.optim` names, per registry entry, the callable whose signature
holds the defaults (``DEFAULTS_FROM``) and the entry's preset values (``PRESETS``, where there are
any).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from kfacbench.optim import METHODS, kfac, sgd, skfac
from kfacbench.optim.peers import asdl, kaisa, modern, torch_optimizer

MODULES = (sgd, kfac, skfac, asdl, torch_optimizer, kaisa, modern)
DEFAULTS_FROM = {name: target for m in MODULES for name, target in m.DEFAULTS_FROM.items()}
PRESETS = {name: preset for m in MODULES for name, preset in getattr(m, "PRESETS", {}).items()}
BUILTIN = [name for name, spec in METHODS.items() if spec.origin == "kfacbench"]
OPTIM = Path(sgd.__file__).parent


def _same(a: object, b: object) -> bool:
    """Equal and of the same type (``1``, ``1.0`` and ``True`` are three kinds of default)."""
    return type(a) is type(b) and a == b


def test_every_builtin_method_names_where_its_defaults_are() -> None:
    missing = sorted(set(BUILTIN) - set(DEFAULTS_FROM))
    assert not missing, f"no DEFAULTS_FROM entry for: {', '.join(missing)}"
    stray = sorted((set(DEFAULTS_FROM) | set(PRESETS)) - set(BUILTIN))
    assert not stray, f"DEFAULTS_FROM/PRESETS name unregistered methods: {', '.join(stray)}"


@pytest.mark.parametrize("name", BUILTIN)
def test_defaults_are_the_signature_s_except_a_preset_s(name: str) -> None:
    spec = METHODS[name]
    target = DEFAULTS_FROM[name]
    where = getattr(target, "__qualname__", repr(target))
    preset = PRESETS.get(name, {})
    undeclared = sorted(set(preset) - set(spec.hparams))
    assert not undeclared, f"{name}: preset of undeclared hyperparameters {undeclared}"
    parameters = inspect.signature(target).parameters
    for key, hp in spec.hparams.items():
        arg = parameters.get(key)
        assert arg is not None and arg.default is not inspect.Parameter.empty, (
            f"{name}: {key!r} is not a keyword argument with a default of {where}"
        )
        if key in preset:
            value = preset[key]
            assert _same(hp.default, value), (
                f"{name}: {key} defaults to {hp.default!r}, its preset says {value!r}"
            )
            assert type(value) is type(arg.default), (
                f"{name}: preset {key} = {value!r} is not of the type of {where}'s "
                f"default {arg.default!r}"
            )
            assert value != arg.default, (
                f"{name}: preset {key} = {value!r} repeats {where}'s default (drop it)"
            )
        else:
            assert _same(hp.default, arg.default), (
                f"{name}: {key} defaults to {hp.default!r}, {where}'s signature to {arg.default!r}"
            )


def test_no_hyperparameter_table_is_written_by_hand() -> None:
    """An ``HParam(...)`` literal would write a default a second time, beside the signature."""
    hits = [
        f"{path.relative_to(OPTIM)}:{number}: {line.strip()}"
        for path in sorted(OPTIM.rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\bHParam\(", line)
    ]
    assert not hits, "HParam(...) in kfacbench/optim (use hparams_from and Param):\n" + "\n".join(
        hits
    )
