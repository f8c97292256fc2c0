"""`kfacbench regress`: normalised phase ratios, baselines by machine kind, caught slowdowns."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

import kfacbench
from kfacbench import cli
from kfacbench.errors import KfacbenchError
from kfacbench.optim.skfac import SKFAC
from kfacbench.runs.regress import (
    ab_records,
    baseline_commit,
    baseline_for,
    check,
    combine,
    export_commit,
    machine_kind,
    normalised_phases,
    read_baseline,
    write_baseline,
)

SUITE = """
name = "rg"
[defaults]
device = "cpu"
data = "synthetic"
max_steps = 30
eval_every = 30
log_every = 10
train_eval_size = 200
[sweep]
workload = ["curves_ae"]
batch_size = [128]
inv_interval = [5]
[optimizers.sgd]
lr = 0.01
[optimizers.skfac]
lr = 0.01
damping = 1.0
"""


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("regress") / "rg.toml"
    path.write_text(SUITE)
    return path


@pytest.fixture(scope="module")
def baseline_run(suite: Path) -> Path:
    out = suite.parent / "runs"
    assert cli.main(["run", str(suite), "--out", str(out)]) == 0
    (run_dir,) = (out / "rg").iterdir()
    return run_dir


def test_ratios_are_normalised_by_the_sgd_step_of_the_same_run(baseline_run: Path) -> None:
    record = normalised_phases(baseline_run)
    sgd_step = record[(record["optimizer"] == "sgd") & (record["phase"] == "step")]
    assert sgd_step["ratio"].tolist() == [1.0]
    skfac = record[record["optimizer"] == "skfac"].set_index("phase")
    assert {"forward", "backward", "curvature", "inverse", "precondition", "update", "step"} <= set(
        skfac.index
    )
    assert skfac.loc["step", "ratio"] == pytest.approx(
        skfac.loc["step", "median_ms"] / sgd_step["median_ms"].iloc[0]
    )
    assert machine_kind(baseline_run).startswith("cpu-")  # per CPU model


def test_a_cpu_model_without_a_baseline_falls_back_to_the_generic_one(tmp_path: Path) -> None:
    assert baseline_for(tmp_path, "cpu-intel-r-xeon-r-processor").name == "cpu.parquet"
    (tmp_path / "cpu-intel-r-xeon-r-processor.parquet").touch()
    assert baseline_for(tmp_path, "cpu-intel-r-xeon-r-processor").name == (
        "cpu-intel-r-xeon-r-processor.parquet"
    )
    assert baseline_for(tmp_path, "cuda-nvidia-h200").name == "cuda-nvidia-h200.parquet"


def test_a_uniformly_slower_machine_is_not_a_regression(baseline_run: Path) -> None:
    record = combine([baseline_run])
    slower = record.assign(
        median_ms=record["median_ms"] * 1.3, sgd_step_ms=record["sgd_step_ms"] * 1.3
    )
    slower["ratio"] = slower["median_ms"] / slower["sgd_step_ms"]
    assert not check(slower, record, 0.10)["regressed"].any()


def test_a_planted_phase_slowdown_is_caught(baseline_run: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.parquet"
    assert (
        cli.main(
            ["regress", "--run", str(baseline_run), "--baseline", str(base), "--update-baseline"]
        )
        == 0
    )
    assert cli.main(["regress", "--run", str(baseline_run), "--baseline", str(base)]) == 0
    slow = shutil.copytree(baseline_run, tmp_path / "slow")
    phases = pd.read_parquet(slow / "phases.parquet")
    cells = pd.read_parquet(slow / "cells.parquet")
    skfac_id = cells.loc[cells["optimizer"] == "skfac", "cell_id"].iloc[0]
    hit = (phases["cell_id"] == skfac_id) & (phases["phase"] == "inverse")
    phases.loc[hit, "median_ms"] *= 2.0
    phases.to_parquet(slow / "phases.parquet")
    result = check(combine([slow]), read_baseline(base), 0.25)
    bad = result[result["regressed"]]
    assert list(zip(bad["optimizer"], bad["phase"], strict=True)) == [("skfac", "inverse")]
    assert cli.main(["regress", "--run", str(slow), "--baseline", str(base)]) == 1


def test_an_injected_delay_fails_the_check(
    suite: Path, baseline_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real slowdown in the code (a 20 ms sleep in SKFAC's preconditioning) is caught by a
    fresh run of the suite against the baseline of the unchanged code."""
    base = tmp_path / "base.parquet"
    assert (
        cli.main(
            ["regress", "--run", str(baseline_run), "--baseline", str(base), "--update-baseline"]
        )
        == 0
    )
    real = SKFAC._natural

    def slowed(self: SKFAC, grads: list) -> list:  # type: ignore[type-arg]
        time.sleep(0.02)
        return real(self, grads)

    monkeypatch.setattr(SKFAC, "_natural", slowed)
    out = tmp_path / "o"
    code = cli.main(["regress", str(suite), "--baseline", str(base), "--out", str(out)])
    assert code == 1
    (run_dir,) = (out / "regress" / "rg").iterdir()
    passes = sorted(run_dir.iterdir())
    assert [p.name for p in passes] == ["pass-1", "pass-2", "pass-3"]
    now = combine(passes)
    result = check(now, read_baseline(base), 0.25).set_index(["optimizer", "phase"])
    assert result.loc[("skfac", "precondition"), "regressed"]
    key = ["optimizer", "phase"]
    added = (now.set_index(key)["median_ms"] - read_baseline(base).set_index(key)["median_ms"])[
        ("skfac", "precondition")
    ]
    assert 15 < added < 40  # the 20 ms sleep, not noise


def test_missing_baseline_and_missing_sgd_are_clear_errors(
    baseline_run: Path, tmp_path: Path
) -> None:
    assert (
        cli.main(["regress", "--run", str(baseline_run), "--baseline", str(tmp_path / "x.parquet")])
        == 2
    )
    # a copy without parts/: its tables are all it has (else the SGD row comes back from them)
    no_sgd = shutil.copytree(
        baseline_run, tmp_path / "nosgd", ignore=shutil.ignore_patterns("parts")
    )
    cells = pd.read_parquet(no_sgd / "cells.parquet")
    cells[cells["optimizer"] != "sgd"].to_parquet(no_sgd / "cells.parquet")
    with pytest.raises(KfacbenchError, match="no SGD cell"):
        normalised_phases(no_sgd)


def _record(ratios: dict[str, float], shares: dict[str, float]) -> pd.DataFrame:
    """A hand-made one-setting record (SKFAC on curves_ae bs=128)."""
    return pd.DataFrame(
        {
            "workload": "curves_ae",
            "batch_size": 128,
            "setting": "skfac",
            "phase": list(ratios),
            "optimizer": "skfac",
            "median_ms": 1.0,
            "sgd_step_ms": 1.0,
            "ratio": list(ratios.values()),
            "ratio_lo": list(ratios.values()),
            "ratio_hi": list(ratios.values()),
            "share": [shares[p] for p in ratios],
            "repeats": 1,
            "machine": "m",
        }
    )


def test_phases_under_the_share_floor_do_not_gate() -> None:
    shares = {"step": 1.0, "update": 0.02, "inverse": 0.03, "precondition": 0.4}
    base = _record({"step": 2.0, "update": 0.04, "inverse": 0.06, "precondition": 0.8}, shares)
    # update doubles (noise-sized phase), inverse grows tenfold to 30% of the step.
    now = _record(
        {"step": 2.0, "update": 0.08, "inverse": 0.6, "precondition": 0.8},
        {**shares, "inverse": 0.3},
    )
    result = check(now, base, 0.25, min_share=0.05).set_index("phase")
    assert not result.loc["update", "gated"] and not result.loc["update", "regressed"]
    assert result.loc["update", "change"] == pytest.approx(2.0)
    assert result.loc["inverse", "gated"] and result.loc["inverse", "regressed"]
    assert not result.loc["precondition", "regressed"] and result.loc["step", "gated"]
    # Without a floor the doubled update is flagged too.
    assert check(now, base, 0.25).set_index("phase").loc["update", "regressed"]


def test_combine_takes_the_median_over_passes_and_keeps_the_range(
    baseline_run: Path, tmp_path: Path
) -> None:
    passes = [shutil.copytree(baseline_run, tmp_path / f"p{i}") for i in range(3)]
    for scale, p in zip((1.0, 1.3, 1.1), passes, strict=True):
        phases = pd.read_parquet(p / "phases.parquet")
        cells = pd.read_parquet(p / "cells.parquet")
        skfac_id = cells.loc[cells["optimizer"] == "skfac", "cell_id"].iloc[0]
        phases.loc[phases["cell_id"] == skfac_id, "median_ms"] *= scale
        phases.to_parquet(p / "phases.parquet")
    one = normalised_phases(baseline_run).set_index(["optimizer", "phase"])
    record = combine(passes).set_index(["optimizer", "phase"])
    base = one.loc[("skfac", "precondition"), "ratio"]
    line = record.loc[("skfac", "precondition")]
    assert line["ratio"] == pytest.approx(1.1 * base)
    assert (line["ratio_lo"], line["ratio_hi"]) == pytest.approx((base, 1.3 * base))
    assert line["repeats"] == 3
    assert record.loc[("sgd", "step"), "ratio"] == 1.0
    assert record.loc[("skfac", "step"), "share"] == 1.0
    # A directory of passes is expanded by --run.
    root = tmp_path / "passes"
    for i, p in enumerate(passes):
        shutil.copytree(p, root / f"pass-{i + 1}")
    out = tmp_path / "b.parquet"
    assert (
        cli.main(["regress", "--run", str(root), "--baseline", str(out), "--update-baseline"]) == 0
    )
    assert (
        read_baseline(out)
        .set_index(["optimizer", "phase"])
        .loc[("skfac", "precondition"), "repeats"]
        == 3
    )


def test_passes_from_different_machines_and_bad_baselines_are_errors(
    baseline_run: Path, tmp_path: Path
) -> None:
    other = shutil.copytree(baseline_run, tmp_path / "other")
    env = (other / "env.json").read_text().replace('"torch_threads": ', '"torch_threads": 10')
    (other / "env.json").write_text(env)
    with pytest.raises(KfacbenchError, match="different machines"):
        combine([baseline_run, other])
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"x": [1]}).to_parquet(bad)
    with pytest.raises(KfacbenchError, match="not a regression baseline"):
        read_baseline(bad)
    with pytest.raises(KfacbenchError, match="--update-baseline"):
        read_baseline(tmp_path / "missing.parquet")
    assert cli.main(["regress", "--run", str(baseline_run), "--repeats", "0"]) == 2


def busy_copy(run_dir: Path, dest: Path) -> Path:
    """The run as if its SKFAC cell had been timed while other processes took the CPUs."""
    copy = Path(shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("parts")))
    cells = pd.read_parquet(copy / "cells.parquet")
    skfac = cells["optimizer"] == "skfac"
    cells.loc[skfac, "busy"] = True
    cells.loc[skfac, "busy_reason"] = "other processes used 0.97 of the 2 CPUs (threshold 0.25)"
    cells.loc[skfac, "other_cpu_share"] = 0.97
    cells.to_parquet(copy / "cells.parquet")
    return copy


def test_busy_passes_do_not_gate(
    baseline_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pass timed on a busy machine is left out; with no quiet pass regress refuses (exit 3)
    instead of reporting phantom regressions, and never records such a pass as a baseline."""
    base = tmp_path / "base.parquet"
    argv = ["regress", "--baseline", str(base)]
    assert cli.main([*argv, "--run", str(baseline_run), "--update-baseline"]) == 0
    busy = busy_copy(baseline_run, tmp_path / "busy")
    capsys.readouterr()
    assert cli.main([*argv, "--run", str(busy)]) == 3
    out = " ".join(capsys.readouterr().out.split())
    assert f"not gating on {busy}" in out and "1 of 2 cells ran on a busy machine" in out
    assert "refusing to gate" in out
    assert cli.main([*argv, "--run", str(busy), "--update-baseline"]) == 3
    assert cli.main([*argv, "--run", str(busy), str(baseline_run)]) == 0  # the quiet pass gates


def git(repo: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(cmd, cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def source_copy(dest: Path, slow_skfac: bool = False) -> Path:
    """A copy of the kfacbench package under ``dest``; ``slow_skfac`` adds a 20 ms sleep to
    SKFAC's preconditioning (appended to the copy's module, so it runs in the copy's process)."""
    pkg = Path(kfacbench.__file__).parent
    shutil.copytree(pkg, dest / "kfacbench", ignore=shutil.ignore_patterns("__pycache__"))
    if slow_skfac:
        with (dest / "kfacbench/optim/skfac.py").open("a") as f:
            f.write(
                "\n_natural = SKFAC._natural\n\n"
                "def _slowed(self, grads):\n"
                "    import time\n\n    time.sleep(0.02)\n    return _natural(self, grads)\n\n"
                "SKFAC._natural = _slowed\n"
            )
    return dest


def test_the_baseline_commit_is_the_one_that_last_wrote_the_file(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "code.py").write_text("v = 1\n")
    (repo / "base.parquet").write_text("baseline")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "code and baseline")
    recorded = git(repo, "rev-parse", "HEAD")
    (repo / "code.py").write_text("v = 2\n")
    git(repo, "commit", "-qam", "later code")
    assert baseline_commit(repo / "base.parquet") == recorded
    assert baseline_commit(repo / "untracked.parquet") is None
    assert baseline_commit(tmp_path / "elsewhere.parquet") is None  # not in a repository
    shallow = tmp_path / "shallow"
    git(tmp_path, "clone", "-q", "--depth", "1", repo.resolve().as_uri(), str(shallow))
    assert baseline_commit(shallow / "base.parquet") is None  # its one commit wrote every file
    tree = export_commit(recorded, repo, tmp_path / "then")
    assert (tree / "code.py").read_text() == "v = 1\n"
    with pytest.raises(KfacbenchError, match=r"cannot export commit 0{40}"):
        export_commit("0" * 40, repo, tmp_path / "none")


def test_an_ab_run_measures_a_slowdown_of_the_code_itself(suite: Path, tmp_path: Path) -> None:
    """Old and new source trees run in alternating processes on this machine: a 20 ms sleep in
    the new tree's SKFAC preconditioning is flagged, and measured as about 20 ms."""
    old = source_copy(tmp_path / "old")
    new = source_copy(tmp_path / "new", slow_skfac=True)
    passes: list[tuple[str, Path]] = []
    before, after = ab_records(
        suite, old, new, 2, tmp_path / "ab", on_pass=lambda s, d: passes.append((s, d))
    )
    assert [s for s, _ in passes] == ["old", "new", "new", "old"]
    for _, run_dir in passes:  # every pass is a fresh process that flushed subnormal floats
        assert pd.read_parquet(run_dir / "cells.parquet")["flush_denormal"].all()
    result = check(after, before, 0.5, 0.05)
    bad = result[result["regressed"]]
    assert ("skfac", "precondition") in set(zip(bad["optimizer"], bad["phase"], strict=True))
    key = ["optimizer", "phase"]
    added = (after.set_index(key)["median_ms"] - before.set_index(key)["median_ms"])[
        ("skfac", "precondition")
    ]
    assert 15 < added < 40
    assert (after["repeats"] == 2).all() and (before["repeats"] == 2).all()


def test_a_baseline_that_does_not_fit_this_machine_is_cleared_by_the_ab_run(
    suite: Path, baseline_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A committed baseline whose SKFAC step ratio is a tenth of this machine's (another VM) flags
    the line; the A/B run of that commit's code (the same code) clears it, exit 0; without the
    confirmation the flag fails the check. (A third was within the noise of these 30-step cells
    once: a slow baseline cell.)"""
    repo = source_copy(tmp_path / "repo")
    record = combine([baseline_run])
    low = (record["optimizer"] == "skfac") & (record["phase"] == "step")
    record.loc[low, "ratio"] /= 10
    write_baseline(record, repo / "base.parquet")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "code and its baseline")
    # Three alternating A/B passes each: with two, the same code's 30-step SKFAC cells once
    # differed by 1.56× on the 2-core VM (one slow pass), above the +50% gate.
    argv = ["regress", str(suite), "--baseline", str(repo / "base.parquet"), "--repeats", "3"]
    capsys.readouterr()
    assert cli.main([*argv, "--out", str(tmp_path / "o1")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert re.search(r"\d+ regressions: [^;]*skfac bs=128 inv=5 step ×", out)
    assert "confirming on this machine" in out
    assert "not confirmed" in out and "does not fit this machine" in out
    assert cli.main([*argv, "--out", str(tmp_path / "o2"), "--no-confirm"]) == 1
    capsys.readouterr()  # a commit that cannot be run leaves the flags standing: exit 1, not 2
    assert cli.main([*argv, "--out", str(tmp_path / "o3"), "--against", "0" * 40]) == 1
    assert "cannot confirm by an A/B run: cannot export commit" in capsys.readouterr().out


def test_a_failed_cell_fails_the_check_instead_of_passing_unmeasured(
    baseline_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base.parquet"
    argv = ["regress", "--baseline", str(base)]
    assert cli.main([*argv, "--run", str(baseline_run), "--update-baseline"]) == 0
    broken = shutil.copytree(baseline_run, tmp_path / "broken")
    cells = pd.read_parquet(broken / "cells.parquet")
    cells.loc[cells["optimizer"] == "skfac", "status"] = "error"
    cells.to_parquet(broken / "cells.parquet")
    result = check(combine([broken]), read_baseline(base), 0.5, 0.05)
    missing = result[result["missing"]]
    assert set(missing["optimizer"]) == {"skfac"} and "step" in set(missing["phase"])
    assert not result.loc[result["optimizer"] == "sgd", "missing"].any()
    capsys.readouterr()
    assert cli.main([*argv, "--run", str(broken)]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "baseline lines not measured" in out and "skfac bs=128 inv=5 step" in out
