"""The docs name only what exists: commands, settings, table columns and linked files.

README.md and docs/*.md are read as Markdown. Every ``kfacbench <command>`` written in their code
is a subcommand of the real parser; the user guide's settings table and its column tables list
exactly the fields of :class:`kfacbench.suite.Settings` and the columns the package writes (both
directions, so a new setting or column fails here until it is documented); every relative link
points at a file of the repository (and at a heading there, when it names one).
"""

from __future__ import annotations

import argparse
import re
import tomllib
from collections.abc import Iterator
from dataclasses import MISSING, fields
from functools import cache
from pathlib import Path

import pytest
import torch
from torch import nn

from kfacbench.cli import build_parser
from kfacbench.core.loop import LoopConfig, train
from kfacbench.core.problem import Problem
from kfacbench.data import Splits
from kfacbench.optim.sgd import SGD
from kfacbench.runner import phase_rows
from kfacbench.runs.schema import CELL_COLUMNS, DIAGNOSTIC_COLUMNS, KERNEL_COLUMNS
from kfacbench.suite import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
USER_GUIDE = DOCS / "user-guide.md"
README_MAX_LINES = 200
"""The README fits on a few screens (issue 29); the rest lives in docs/."""

COMMAND = re.compile(r"(?<![\w./-])(?<!check )(?<!from )kfacbench[ \t]+([a-z][\w-]*)")
"""``kfacbench <word>`` where ``kfacbench`` is the program: not a path (``kfacbench/cli.py``,
``ruff check kfacbench tests``) or a module (``kfacbench.suite``)."""
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
NAME = re.compile(r"`([\w.]+)`")
TABLE_HEADING = re.compile(r"^#{2,4} .*`(\w+)\.parquet`", re.M)


def doc_files() -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def code_spans(text: str) -> Iterator[str]:
    """The text of every fenced code block and inline code span."""
    fenced = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
    yield from fenced.findall(text)
    yield from re.findall(r"`([^`\n]+)`", fenced.sub("", text))


def split_row(line: str) -> list[str]:
    """The cells of a Markdown table row (``\\|`` is a pipe inside a cell)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def first_table(text: str, start: int) -> tuple[list[str], list[list[str]]]:
    """The header and body rows of the first Markdown table at or after ``start``."""
    lines = text[start:].splitlines()
    begin = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if begin is None:
        return [], []
    rows = []
    for line in lines[begin:]:
        if not line.startswith("|"):
            break
        rows.append(split_row(line))
    return rows[0], [r for r in rows[2:] if r]


def section(text: str, heading: str) -> int:
    """The offset of the heading whose text is ``heading`` (any level)."""
    match = re.search(rf"^#+ {re.escape(heading)}\s*$", text, re.M)
    assert match, f"{USER_GUIDE.relative_to(ROOT)}: no heading {heading!r}"
    return match.end()


def first_names(rows: list[list[str]], where: str) -> list[str]:
    """The backticked name in the first cell of each row."""
    names = []
    for row in rows:
        match = NAME.match(row[0])
        assert match, f"{where}: a row's first cell is not a `name`: {row[0]!r}"
        names.append(match.group(1))
    return names


def subcommands() -> set[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(actions[0].choices)


@cache
def tiny_run() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The columns of the curves and phases tables, as the training loop and the runner write
    them (no tuple names them): two steps of SGD on a tiny classifier."""
    torch.manual_seed(0)
    problem = Problem(nn.Sequential(nn.Linear(3, 2)), "categorical")
    x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    data = Splits(x[:16], y[:16], x[16:], y[16:], "synthetic")
    config = LoopConfig(
        batch_size=8,
        seed=0,
        max_steps=2,
        max_seconds=None,
        eval_every=1,
        log_every=1,
        train_eval_size=8,
        eval_size=8,
    )
    result = train(problem, SGD(problem), data, config, metric="accuracy", reached=lambda v: False)
    # The store adds the cell id to every row of both tables (RunStore.write_cell).
    return ("cell_id", *result.curves[0]), ("cell_id", *phase_rows(result)[0])


def package_columns(table: str) -> tuple[str, ...]:
    """The columns the package writes to ``<table>.parquet``."""
    if table == "curves":
        return tiny_run()[0]
    if table == "phases":
        return tiny_run()[1]
    known = {"cells": CELL_COLUMNS, "kernels": KERNEL_COLUMNS, "diagnostics": DIAGNOSTIC_COLUMNS}
    assert table in known, f"{USER_GUIDE.relative_to(ROOT)}: no such table {table}.parquet"
    return tuple(known[table])


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (a repeated heading gets ``-1``, ``-2``, ...)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#+ (.+?)\s*$", text, re.M):
        base = slug(heading)
        out.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return out


def test_the_docs_are_there_and_the_readme_is_short() -> None:
    expected = {
        "user-guide.md",
        "methods.md",
        "gpu.md",
        "ci.md",
        "results.md",
        "glossary.md",
        "development.md",
    }
    missing = expected - {p.name for p in DOCS.glob("*.md")}
    assert not missing, f"docs/ lacks {sorted(missing)}"
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; at most {README_MAX_LINES}: move detail to docs/"
    )


def test_every_command_in_the_docs_exists() -> None:
    known = subcommands()
    found: set[str] = set()
    wrong = []
    for path in doc_files():
        for code in code_spans(path.read_text()):
            for name in COMMAND.findall(code):
                found.add(name)
                if name not in known:
                    wrong.append(f"{path.relative_to(ROOT)}: `kfacbench {name}`")
    assert not wrong, f"not commands (the parser has {', '.join(sorted(known))}): {wrong}"
    assert {"run", "show", "report"} <= found, "the command scan found nothing: is it broken?"


def test_the_user_guide_covers_every_command() -> None:
    text = USER_GUIDE.read_text()
    written = {name for code in code_spans(text) for name in COMMAND.findall(code)}
    missing = subcommands() - written
    shown = ", ".join(f"`kfacbench {name}`" for name in sorted(missing))
    assert not missing, f"docs/user-guide.md never shows {shown}"


def test_the_settings_table_lists_exactly_the_settings() -> None:
    header, rows = first_table(USER_GUIDE.read_text(), section(USER_GUIDE.read_text(), "Settings"))
    assert header[:2] == ["setting", "type"], f"docs/user-guide.md, Settings: header {header}"
    documented = first_names(rows, "docs/user-guide.md, Settings")
    assert len(documented) == len(set(documented)), f"a setting is listed twice: {documented}"
    real = {f.name: f for f in fields(Settings)}
    unknown = [name for name in documented if name not in real]
    assert not unknown, f"docs/user-guide.md documents settings that do not exist: {unknown}"
    undocumented = [name for name in real if name not in documented]
    assert not undocumented, f"docs/user-guide.md, Settings: add rows for {undocumented}"
    default = header.index("default")
    for name, row in zip(documented, rows, strict=True):
        literal = re.fullmatch(r"`([^`]+)`", row[default])
        if literal is None:  # prose: a default TOML cannot write (no budget, ...)
            continue
        value = tomllib.loads(f"v = {literal.group(1)}")["v"]
        assert value == real[name].default and real[name].default is not MISSING, (
            f"docs/user-guide.md: setting {name} defaults to {real[name].default!r},"
            f" the table says {literal.group(1)}"
        )


@pytest.mark.parametrize("table", ["cells", "curves", "phases", "kernels", "diagnostics"])
def test_each_table_is_documented_column_by_column(table: str) -> None:
    text = USER_GUIDE.read_text()
    headings = {m.group(1): m.end() for m in TABLE_HEADING.finditer(text)}
    assert table in headings, f"docs/user-guide.md: no heading naming `{table}.parquet`"
    header, rows = first_table(text, headings[table])
    where = f"docs/user-guide.md, {table}.parquet"
    assert header[:1] == ["column"], f"{where}: the table's header is {header}"
    documented = first_names(rows, where)
    real = package_columns(table)
    unknown = [c for c in documented if c not in real]
    assert not unknown, f"{where}: columns the package does not write: {unknown}"
    undocumented = [c for c in real if c not in documented]
    assert not undocumented, f"{where}: add a row per column for {undocumented}"
    assert len(documented) == len(set(documented)), f"{where}: a column is listed twice"


def test_every_relative_link_points_at_a_file_of_the_repository() -> None:
    checked, broken = 0, []
    for path in doc_files():
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            checked += 1
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(ROOT)}: {target}"
            if not dest.is_relative_to(ROOT):
                broken.append(f"{where} (outside the repository)")
            elif not dest.exists():
                broken.append(f"{where} (no such file or folder)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)
    assert checked > 20, f"only {checked} links found: is the link scan broken?"
