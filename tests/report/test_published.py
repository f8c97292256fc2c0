"""Published reports: each records the command that rebuilds it, rebuilds byte-identical from
committed runs, and says plainly when a run could not be published (a dirty tree, a path of
the machine, no manifest)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from kfacbench import cli
from kfacbench.report.data import ABSOLUTE_PATH
from kfacbench.report.document import UNPUBLISHABLE

REPO = Path(__file__).resolve().parents[2]
REPORTS = sorted(p.parent for p in (REPO / "reports").glob("*/summary.md"))

SUITE = """
name = "pub"
[defaults]
device = "cpu"
data = "synthetic"
max_steps = 6
eval_every = 3
log_every = 3
[sweep]
workload = ["curves_ae"]
batch_size = [50]
inv_interval = [3]
seed = [0]
[optimizers.sgd]
lr = 0.01
[optimizers.kfac]
"""


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository-shaped folder with one run under results/<device>/<date>/ and its report."""
    root = tmp_path_factory.mktemp("published")
    (root / "pub.toml").write_text(SUITE)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert cli.main(["run", "pub.toml", "--out", "results/cpu/box/2026-01-01"]) == 0
        (run,) = Path("results/cpu/box/2026-01-01/pub").iterdir()
        env = json.loads((run / "env.json").read_text())
        manifest = json.loads((run / "manifest.json").read_text())
        # The test suite runs from a checkout that may have uncommitted changes: pose as clean.
        env["git_commit"] = manifest["commit"] = "0123456789ab"
        manifest["dirty"] = False
        (run / "env.json").write_text(json.dumps(env))
        (run / "manifest.json").write_text(json.dumps(manifest))
        assert cli.main(["report", str(run), "-o", "reports/pub"]) == 0
    return root


def test_a_published_run_reports_its_command_and_commit_and_no_warning(published: Path) -> None:
    md = (published / "reports/pub/summary.md").read_text()
    (run,) = (published / "results/cpu/box/2026-01-01/pub").iterdir()
    rel = run.relative_to(published).as_posix()
    assert md.splitlines()[2] == f"Rebuild: `kfacbench report {rel} -o reports/pub`"
    assert f"run `{rel}`: commit 0123456789ab, made by `kfacbench run pub.toml --out" in md
    assert UNPUBLISHABLE not in md and not ABSOLUTE_PATH.search(md)


def test_synthetic_runs_get_no_race_to_the_target(published: Path) -> None:
    md = (published / "reports/pub/summary.md").read_text()
    assert "not drawn for curves_ae: timing-only run (synthetic data)" in md
    assert "| time to target |" not in md and "## Step cost" in md
    assert not (published / "reports/pub/time_to_target.png").exists()


def test_rebuild_check_passes_then_catches_an_edit(
    published: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(published)
    assert cli.main(["rebuild", "--check"]) == 0
    assert "reports/pub: summary.md rebuilds identical" in capsys.readouterr().out
    summary = published / "reports/pub/summary.md"
    original = summary.read_text()
    summary.write_text(original.replace("## Step cost", "## Step costs"))
    try:
        assert cli.main(["rebuild", "--check", "reports/pub"]) == 1
        out = capsys.readouterr().out
        assert "-## Step costs" in out and "+## Step cost" in out
        assert cli.main(["rebuild", "reports/pub"]) == 0  # rebuilt in place
        assert summary.read_text() == original
    finally:
        summary.write_text(original)


def test_rebuild_refuses_a_report_without_its_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports/old").mkdir(parents=True)
    (tmp_path / "reports/old/summary.md").write_text("# kfacbench report: x\n")
    assert cli.main(["rebuild", "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "reports/old/summary.md: no 'Rebuild:" in err


@pytest.mark.parametrize("problem", ["dirty", "outside", "no manifest", "machine path"])
def test_a_run_that_cannot_be_published_says_so_plainly(
    published: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, problem: str
) -> None:
    (run,) = (published / "results/cpu/box/2026-01-01/pub").iterdir()
    copy = published / "results/cpu/box/2026-01-02/pub" / problem.replace(" ", "-")
    shutil.copytree(run, copy)
    monkeypatch.chdir(published)
    given = copy.relative_to(published)
    manifest = json.loads((copy / "manifest.json").read_text())
    if problem == "dirty":
        manifest["commit"] += "-dirty"
        expected = "was made from a tree with uncommitted changes (0123456789ab-dirty)"
    elif problem == "outside":
        given = Path(shutil.copytree(copy, tmp_path / "elsewhere"))
        expected = "is outside the working directory"
    elif problem == "no manifest":
        (copy / "manifest.json").unlink()
        expected = "has no manifest.json"
    else:
        manifest["command"] += " --data-dir /home/someone/data"
        expected = "its command names a path of the machine"
    if (copy / "manifest.json").exists():
        (copy / "manifest.json").write_text(json.dumps(manifest))
        if given != copy.relative_to(published):
            (given / "manifest.json").write_text(json.dumps(manifest))
    out = Path("reports") / problem.replace(" ", "-")
    assert cli.main(["report", str(given), "-o", str(out)]) == 0
    md = (out / "summary.md").read_text()
    head = md.split("## ")[0]  # above the first section: where a reader starts
    assert expected in head and f"> **Warning**: {UNPUBLISHABLE}" in head


@pytest.mark.parametrize("report", REPORTS, ids=[p.name for p in REPORTS])
def test_every_committed_report_rebuilds_identical(
    report: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one command of its header, run on the committed tables, gives the committed
    Markdown byte for byte (``kfacbench rebuild --check``); and a report that names a machine's
    path or a dirty commit says that it cannot be published, at its top."""
    monkeypatch.chdir(REPO)
    assert cli.main(["rebuild", "--check", str(report.relative_to(REPO))]) == 0
    md = (report / "summary.md").read_text()
    leaks = ABSOLUTE_PATH.findall(md) + re.findall(r"[0-9a-f]{7,}-dirty", md)
    if leaks:
        assert UNPUBLISHABLE in md.split("## ")[0], leaks


MACHINE_PATH = re.compile(
    r"(?<![\w.~/-])/(?:tmp|work|home|root|Users|opt|var|mnt|scratch|private|usr/lib|usr/local)/"
)
"""A folder of some machine: a reader cannot follow it, and it says where someone's files were
(``/usr/bin/env`` in a shebang, or torch's build paths such as ``/pytorch/torch/csrc``, are not)."""

DIRTY_COMMIT = re.compile(r"[0-9a-f]{7,40}-dirty")


def committed(*folders: str) -> list[Path]:
    """The files git tracks under ``folders`` (a fresh clone's files, not local run folders)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", *folders], cwd=REPO, capture_output=True, check=False
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [REPO / name for name in listed.stdout.decode().split("\0") if name]


def test_no_published_file_names_a_machine_path_or_a_dirty_commit() -> None:
    """Every committed table, log and report under results/ and reports/: their text, and every
    string of every parquet table (the error column quotes torch's stack traces)."""
    leaks: list[str] = []
    for path in committed("results", "reports"):
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
            texts = [str(v) for col in frame.select_dtypes(exclude="number") for v in frame[col]]
        elif path.suffix in (".png", ".npz"):
            continue
        else:
            texts = [path.read_text(encoding="utf-8")]
        for text in texts:
            for found in MACHINE_PATH.findall(text) + DIRTY_COMMIT.findall(text):
                leaks.append(f"{path.relative_to(REPO)}: {found}")
    assert not leaks, leaks
