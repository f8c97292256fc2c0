"""`kfacbench report`: every figure is a valid image, the HTML is self-contained."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from kfacbench import cli
from kfacbench.report import (
    ReportData,
    _median_band,
    busy_warnings,
    optimizer_colors,
    peer_table,
    performance_profile,
    time_to_target_table,
)

SUITE = """
name = "r"
[defaults]
device = "cpu"
data = "real"
max_steps = 40
eval_every = 20
log_every = 10
train_eval_size = 500
[sweep]
workload = ["curves_ae"]
batch_size = [100, 200]
inv_interval = [2, 10]
seed = [0, 1]
[optimizers.sgd]
lr = 0.01
[optimizers.skfac]
lr = 0.05
damping = 1.0
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    suite = root / "r.toml"
    suite.write_text(SUITE)
    out = root / "out"
    assert cli.main(["run", str(suite), "--out", str(out), "--cache-dir", str(root)]) == 0
    (run_dir,) = (out / "r").iterdir()
    assert (
        cli.main(
            [
                "profile",
                str(suite),
                "--out",
                str(out / "p"),
                "--steps",
                "2",
                "--only",
                "bs=100 inv=2",
            ]
        )
        == 0
    )
    (prof_dir,) = (out / "p" / "r").iterdir()
    dest = root / "report"
    assert cli.main(["report", str(run_dir), str(prof_dir), "-o", str(dest)]) == 0
    return dest


def test_every_figure_exists_and_is_a_valid_image(report: Path) -> None:
    expected = {"loss_curves_ae", "phases", "scaling_batch_size", "scaling_inv_interval"}
    pngs = {p.stem for p in report.glob("*.png")}
    assert expected <= pngs
    for stem in pngs:
        with Image.open(report / f"{stem}.png") as image:
            image.verify()
            assert image.format == "PNG"
        with Image.open(report / f"{stem}.png") as image:
            assert image.size[0] > 300 and image.size[1] > 200
        svg = (report / f"{stem}.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg


def test_html_is_self_contained(report: Path) -> None:
    page = (report / "index.html").read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", page)
    assert refs and all(ref.startswith("data:image/png;base64,") for ref in refs)
    assert "@import" not in page and "<link" not in page and "<script" not in page
    assert page.count("<img") == len(list(report.glob("*.png")))
    assert "kfacbench report: r" in page and "torch" in page  # environment header
    assert "[optimizers.skfac]" in page  # the suite as run


def test_markdown_summary(report: Path) -> None:
    md = (report / "summary.md").read_text()
    assert md.startswith("# kfacbench report: r")
    assert "| workload | optimizer | setting |" in md
    for png in report.glob("*.png"):
        assert f"]({png.name})" in md


def test_colors_are_fixed_per_optimizer() -> None:
    a, b = optimizer_colors(["sgd"]), optimizer_colors(["skfac", "sgd", "asdl-kfac"])
    assert a["sgd"] == b["sgd"] and a["skfac"] == b["skfac"]
    assert len(set(b.values())) == len(b)


def test_time_to_target_and_performance_profile_by_hand() -> None:
    cells = pd.DataFrame(
        {
            "workload": ["w1"] * 3 + ["w2"] * 3,
            "optimizer": ["sgd", "sgd", "kfac", "sgd", "sgd", "kfac"],
            "setting": ["s1", "s2", "k", "s1", "s2", "k"],
            "status": ["ok"] * 6,
            "time_to_target_s": [10.0, 20.0, 5.0, 8.0, float("nan"), 16.0],
            "median_step_ms": [1.0] * 6,
        }
    )
    table = time_to_target_table(cells).set_index(["workload", "setting"])
    assert table.loc[("w1", "k"), "speedup_vs_best_sgd"] == pytest.approx(2.0)
    assert table.loc[("w2", "k"), "speedup_vs_best_sgd"] == pytest.approx(0.5)
    profile = performance_profile(table.reset_index())
    at = profile.set_index(["optimizer", "tau"])["fraction"]
    assert at[("kfac", 1.0)] == 0.5 and at[("sgd", 1.0)] == 0.5  # each best on one workload
    assert at[("kfac", 2.0)] == 1.0 and at[("sgd", 2.0)] == 1.0  # within 2× everywhere
    assert at[("sgd", 1.975)] == 0.5


CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
    None,
)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian package 'chromium')")
def test_the_report_renders_in_a_headless_browser(report: Path, tmp_path: Path) -> None:
    """A real browser loads the page offline and draws the tables and the embedded figures."""
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,3000",
            f"--screenshot={shot}",
            (report / "index.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with Image.open(shot) as image:
        gray = image.convert("L")
        width, height = gray.size
        pixels = gray.tobytes()
    assert (width, height) == (1280, 3000)
    dark = sum(1 for p in pixels if p < 128) / len(pixels)
    colored = image_colorful_fraction(shot)
    assert dark > 0.005  # text and axes were drawn
    assert colored > 0.01  # the figures' coloured lines and bars were drawn (images loaded)


def image_colorful_fraction(path: Path) -> float:
    """The fraction of pixels whose channels differ by more than 60 (not gray/white/black)."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        data = rgb.tobytes()
    n = len(data) // 3
    colorful = sum(
        1 for i in range(0, len(data), 3) if max(data[i : i + 3]) - min(data[i : i + 3]) > 60
    )
    return colorful / n


def test_peer_table_pairs_each_peer_with_its_kfacbench_preset() -> None:
    def cell(optimizer: str, median: float, train_s: float, workload: str = "mnist_ae") -> dict:  # type: ignore[type-arg]
        return {
            "workload": workload,
            "batch_size": 1000,
            "optimizer": optimizer,
            "status": "ok",
            "median_step_ms": median,
            "train_time_s": train_s,
            "steps": 10,
        }

    cells = pd.DataFrame(
        [
            cell("kfac-fast", 300.0, 4.0),
            cell("asdl-kfac", 200.0, 2.0),
            cell("skfac", 100.0, 1.0),  # no asdl-skfac on this workload: no row
            cell("sgd", 50.0, 0.5),
            cell("asdl-skfac", 80.0, 1.0, workload="faces_ae"),  # no skfac there: no row
        ]
    )
    data = ReportData(cells, pd.DataFrame(), pd.DataFrame(), None, [], [])
    table = peer_table(data)
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["kfacbench"], row["peer"]) == ("kfac-fast", "asdl-kfac")
    assert row["median_ratio"] == pytest.approx(1.5)
    assert row["mean_ratio"] == pytest.approx(400.0 / 200.0)
    assert row["median_step_ms"] == "300 / 200"
    no_peers = ReportData(
        cells[cells["optimizer"] == "sgd"], pd.DataFrame(), pd.DataFrame(), None, [], []
    )
    assert peer_table(no_peers).empty


def test_loss_bands_cover_only_the_logged_range() -> None:
    runs = [
        pd.DataFrame({"step": [20, 40, 60], "train_loss": [3.0, 2.0, 1.0]}),
        pd.DataFrame({"step": [10, 30, 50], "train_loss": [4.0, 2.0, 0.0]}),
    ]
    grid, med, low, high = _median_band(runs, "step")
    assert grid[0] == 20 and grid[-1] == 50  # where both seeds have points
    assert low[0] == pytest.approx(3.0) and high[0] == pytest.approx(3.0)  # 4 - 2·(10/20)
    assert med[-1] == pytest.approx(0.75)  # the median of 1.5 and 0


def test_busy_cells_are_a_warning_naming_them() -> None:
    cells = pd.DataFrame(
        {
            "label": ["a sgd", "a kfac", "a skfac"],
            "busy": [False, True, None],  # None: a table without a measurement for that cell
            "other_cpu_share": [0.0, 0.97, math.nan],
            "steal_share": [0.0, 0.0, math.nan],
        }
    )
    (line,) = busy_warnings(cells)
    assert line.startswith("1 of 3 cells ran on a busy machine (other processes used up to 0.97")
    assert line.endswith("Busy cells: a kfac")
    assert busy_warnings(cells.assign(busy=False)) == []
    assert busy_warnings(cells.drop(columns="busy")) == []  # tables from before the column
