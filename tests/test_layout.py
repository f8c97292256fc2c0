"""The package's own structure (DESIGN.md, "Package layout"; issue 29).

- Imports run one way: a module imports only from its own layer or a lower one
  (:data:`LAYERS`); the exceptions being removed now are listed in :data:`ALLOWED`, each with its
  reason, and an entry that no longer occurs fails too, so the list only shrinks.
- Each ``kfacbench`` command lives in its own module of ``kfacbench/cli/``.
- No module is over :data:`MAX_LINES` lines unless its docstring says why, in a line starting
  with ``Size:``.
- The tests mirror the package: ``tests/<dirs>/test_<name>.py`` tests ``kfacbench/<dirs>/<name>.py``
  or the package ``<name>`` there (:func:`module_tested_by`), except the files of
  :data:`NOT_ONE_MODULE`, each with its reason.
- Every package is in pyproject's ``packages`` (else an installed kfacbench lacks it).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import kfacbench
from kfacbench.cli import COMMANDS, build_parser

PACKAGE = Path(kfacbench.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent

LAYERS: dict[str, int] = {
    "kfacbench.cli": 5,
    "kfacbench.__main__": 5,
    "kfacbench.report": 4,
    "kfacbench.diagnostics": 4,
    "kfacbench.runner": 4,
    "kfacbench.doctor": 4,
    "kfacbench.profiling": 4,
    "kfacbench.launch": 4,
    "kfacbench.cluster": 4,
    "kfacbench.suite": 3,
    "kfacbench.plugins": 3,  # the suite registers a suite's plugins while it reads it
    "kfacbench.optim": 2,
    "kfacbench.workloads": 2,
    "kfacbench.core": 1,
    "kfacbench.data": 1,
    "kfacbench.runs": 1,
    "kfacbench.distributed": 1,  # communication only: the core's loop shards and reduces with it
    "kfacbench.machine_load": 1,  # imports nothing of kfacbench; runs and the runner read it
    "kfacbench.errors": 0,
    "kfacbench": 0,  # the package itself (its version): only this exact name
}
"""Each top-level module or package of kfacbench and its layer: cli > report, diagnostics,
runner, doctor, profiling, launch, cluster > suite, plugins > optim, workloads > core, data, runs >
errors (DESIGN.md). Modules of one layer may import each other."""

ALLOWED: dict[tuple[str, str], str] = {}
"""Upward imports being removed now: (importing module, imported module) and why it is here."""

MAX_LINES = 600
"""Longer modules need a ``Size:`` line in their docstring giving the reason."""

CLI_HELPERS = {"kfacbench.cli", "kfacbench.cli.__main__", "kfacbench.cli.common"}
"""The modules of ``kfacbench/cli/`` that are not a command."""

MODULE_OF = {"list": "listing"}
"""Commands whose module is not named after them (``list`` would shadow the builtin in the
package's namespace)."""

NOT_ONE_MODULE: dict[str, str] = {
    "test_docs.py": "the docs against the code (commands, settings, columns, links)",
    "test_layout.py": "the package's structure",
    "test_suite_fuzz.py": "suite.py, fuzzed through `kfacbench run --dry-run` (1,400 lines)",
    "test_tensorboard.py": "profiling.py's traces, served by a real TensorBoard",
    "optim/test_hparams.py": "every built-in method's defaults written once, across optim/",
    "optim/test_kfac_curves.py": "K-FAC against an SGD grid on CURVES, end to end (issue 3)",
    "optim/test_weight_sharing.py": "K-FAC's weight-sharing layers across capture, factors, kfac",
    "report/test_published.py": "the published reports under reports/ rebuild byte-identical",
    "bench/": "pytest-benchmark's step and phase benchmarks (DESIGN.md: tests/bench)",
    "workloads/test_gpu_scale.py": "the GPU-scale workloads with every method, and gpu_scale.toml",
    # pytest needs distinct basenames (no __init__.py in tests/): the second module of a name
    "optim/test_memory_model.py": "optim/memory.py (core/memory.py's tests hold test_memory.py)",
    "report/test_memory_table.py": "report/memory.py (core/memory.py's tests hold the name)",
    "workloads/test_cost_growth.py": "workloads/scaling.py (report/scaling.py's hold the name)",
}
"""Test files (relative to ``tests/``; a folder ends in ``/``) that test no one module of
kfacbench, and what they test instead."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield module_name(path), path


def is_module(name: str) -> bool:
    """Whether ``name`` is a module or package of kfacbench (not a name defined in one)."""
    rel = Path(*name.split("."))
    base = PACKAGE.parent / rel
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """The kfacbench modules that ``name`` imports (at any depth: inside functions and
    ``TYPE_CHECKING`` blocks too), with their line numbers."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{parent}.{node.module}" if node.module else parent
            else:
                source = node.module or ""
            for alias in node.names:
                full = f"{source}.{alias.name}"
                yield (full if is_module(full) else source), node.lineno


def layer(name: str) -> int | None:
    """The layer of a kfacbench module, from the longest entry of :data:`LAYERS` it is in."""
    if name == "kfacbench":
        return LAYERS["kfacbench"]
    prefixes = [p for p in LAYERS if p != "kfacbench" and (name == p or name.startswith(p + "."))]
    return LAYERS[max(prefixes, key=len)] if prefixes else None


def upward(name: str, path: Path) -> dict[tuple[str, str], str]:
    """The imports of one module from its layer to a higher one: (importer, imported) -> where."""
    found = {}
    own = layer(name)
    for target, line in imports(name, path):
        if target != "kfacbench" and not target.startswith("kfacbench."):
            continue
        theirs = layer(target)
        if own is not None and theirs is not None and theirs > own:
            file = path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE.parent) else path
            where = f"{file}:{line}: {name} (layer {own}) imports {target} (layer {theirs})"
            found[(name, target)] = where
    return found


def upward_imports() -> dict[tuple[str, str], str]:
    """Every import in the package from a lower layer to a higher one."""
    return {key: where for name, path in modules() for key, where in upward(name, path).items()}


def test_every_module_has_a_layer() -> None:
    unplaced = [name for name, _ in modules() if layer(name) is None]
    assert not unplaced, f"modules without a layer in LAYERS: {', '.join(unplaced)}"


def test_imports_run_one_way() -> None:
    upward = upward_imports()
    bad = [line for key, line in sorted(upward.items()) if key not in ALLOWED]
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_every_allowed_upward_import_still_occurs() -> None:
    """ALLOWED only shrinks: an entry whose import is gone must be deleted."""
    gone = sorted(set(ALLOWED) - set(upward_imports()))
    assert not gone, "ALLOWED entries that no longer occur (delete them): " + ", ".join(
        f"{a} -> {b}" for a, b in gone
    )


def test_the_scan_finds_an_upward_import_wherever_it_is(tmp_path: Path) -> None:
    """The check is not vacuous: an upward import is found at the top, inside a function and in
    a relative form, and names the module and the import."""
    path = tmp_path / "fake.py"
    path.write_text(
        "from kfacbench import cli\n"
        "from kfacbench.runs.store import RunStore\n"
        "def f():\n"
        "    from ..report import data\n"
        "    import kfacbench.runner\n"
    )
    found = upward("kfacbench.runs.fake", path)
    assert sorted(found) == [
        ("kfacbench.runs.fake", "kfacbench.cli"),
        ("kfacbench.runs.fake", "kfacbench.report.data"),
        ("kfacbench.runs.fake", "kfacbench.runner"),
    ]
    assert (
        "kfacbench.runs.fake (layer 1) imports kfacbench.cli (layer 5)"
        in found[("kfacbench.runs.fake", "kfacbench.cli")]
    )


def module_tested_by(test: Path) -> str | None:
    """The kfacbench module that ``test`` (``tests/<dirs>/test_<name>.py``) tests:
    ``kfacbench/<dirs>/<name>.py``, the package ``kfacbench/<dirs>/<name>/``, or the package
    ``kfacbench/<dirs>/`` itself when ``<name>`` is its own name (``tests/report/test_report.py``);
    None when there is none (the file is misplaced or misnamed)."""
    rel = test.relative_to(TESTS)
    name = rel.stem.removeprefix("test_")
    base = PACKAGE.joinpath(*rel.parent.parts)
    candidates = [base / f"{name}.py", base / name / "__init__.py"]
    if rel.parent.parts and rel.parent.name == name:
        candidates.append(base / "__init__.py")
    return next((module_name(c) for c in candidates if c.is_file()), None)


def exception_of(test: Path) -> str | None:
    """The entry of :data:`NOT_ONE_MODULE` that covers ``test``, if any."""
    rel = test.relative_to(TESTS).as_posix()
    return next(
        (k for k in NOT_ONE_MODULE if rel == k or (k[-1] == "/" and rel.startswith(k))), None
    )


def all_test_files() -> list[Path]:
    return sorted(TESTS.rglob("test_*.py"))


def test_each_test_file_sits_where_the_module_it_tests_sits() -> None:
    misplaced = [
        str(t.relative_to(TESTS))
        for t in all_test_files()
        if not module_tested_by(t) and not exception_of(t)
    ]
    assert not misplaced, (
        "test files that match no kfacbench module (move them to tests/<pkgpath>/test_<module>.py "
        "or add them to NOT_ONE_MODULE with the reason): " + ", ".join(misplaced)
    )


def test_every_exception_is_still_needed() -> None:
    """NOT_ONE_MODULE only shrinks: an entry that covers no file, or a file that now matches a
    module, must be deleted."""
    covered = {exception_of(t): t for t in all_test_files() if exception_of(t)}
    stale = sorted(set(NOT_ONE_MODULE) - set(covered))
    assert not stale, "NOT_ONE_MODULE entries that cover no test file: " + ", ".join(stale)
    mapped = sorted(k for k, t in covered.items() if not k.endswith("/") and module_tested_by(t))
    assert not mapped, "NOT_ONE_MODULE entries whose file matches a module: " + ", ".join(mapped)


@pytest.mark.parametrize(
    ("path", "module"),
    [
        ("runs/test_compare.py", "kfacbench.runs.compare"),
        ("optim/peers/test_asdl.py", "kfacbench.optim.peers.asdl"),
        ("test_suite.py", "kfacbench.suite"),
        ("report/test_report.py", "kfacbench.report"),
        ("optim/test_peers.py", "kfacbench.optim.peers"),
        ("test_compare.py", None),  # compare.py lives in runs/
        ("data/test_data_idx.py", None),  # the module is data/idx.py
        ("diagnostics/test_diagnose.py", None),
        ("test_optim.py", "kfacbench.optim"),
        ("core/test_optim.py", None),
    ],
)
def test_the_mapping_tells_a_misplaced_test_file(path: str, module: str | None) -> None:
    """Made-up paths (nothing is created): the rule can fail."""
    test = TESTS / path
    assert module_tested_by(test) == module
    if module is None:
        assert exception_of(test) is None


def test_every_package_is_installed() -> None:
    """pyproject lists the packages by hand: a new subpackage left out would be missing from an
    installed kfacbench (the tests, run from the source tree, would not notice)."""
    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(pyproject["tool"]["setuptools"]["packages"]) - {"kfacbench.suites"}
    found = {module_name(path) for path in PACKAGE.rglob("__init__.py")}
    assert listed == found, (
        f"missing from pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"
    )


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def command_modules() -> list[str]:
    names = (name for name, _ in modules() if name.startswith("kfacbench.cli"))
    return sorted(n for n in names if n not in CLI_HELPERS)


def test_each_command_lives_in_its_own_module() -> None:
    parsers = commands()
    expected = sorted(f"kfacbench.cli.{MODULE_OF.get(c, c)}" for c in parsers)
    assert command_modules() == expected
    assert sorted(m.__name__ for m in COMMANDS) == expected
    for command, parser in parsers.items():
        module = f"kfacbench.cli.{MODULE_OF.get(command, command)}"
        func = parser.get_default("func")
        assert func.__module__ == module and func.__name__ == f"cmd_{command}", command


@pytest.mark.parametrize("module", command_modules())
def test_a_command_module_adds_its_command_and_no_other(module: str) -> None:
    sub = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(module).add_parser(sub)
    (command,) = sub.choices
    assert module == f"kfacbench.cli.{MODULE_OF.get(command, command)}"
    path = PACKAGE.parent / Path(*module.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    cmds = [
        n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("cmd_")
    ]
    assert cmds == [f"cmd_{command}"]


def test_the_cli_helpers_define_no_command() -> None:
    for name, path in modules():
        if name in CLI_HELPERS:
            tree = ast.parse(path.read_text(encoding="utf-8"))
            defs = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
            assert not [d for d in defs if d.startswith("cmd_") or d == "add_parser"], name


def test_no_module_is_long_without_a_reason() -> None:
    long = []
    for name, path in modules():
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not any(line.startswith("Size:") for line in doc.splitlines()):
            long.append(f"{name} ({lines} lines)")
    assert not long, (
        f"over {MAX_LINES} lines without a 'Size:' line in the module docstring: " + ", ".join(long)
    )
