"""`kfacbench report`: every figure is a valid image, the HTML is self-contained."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from seaborn.external import husl
from shared_diagnostics import SUITE as DIAGNOSE_SUITE
from shared_diagnostics import tiny_workload

from kfacbench import cli
from kfacbench.report.data import ReportData, load_runs, setting_names
from kfacbench.report.figures import DIVERGE_FACTOR, build_figures, clip_diverged
from kfacbench.report.plotting import (
    Figures,
    fit_titles,
    median_band,
    optimizer_colors,
    short_labels,
    title_texts,
    wants_log_axis,
)
from kfacbench.report.tables import (
    busy_warnings,
    errored_workloads,
    not_races,
    peer_table,
    performance_profile,
    step_time_table,
    time_to_target_display,
    time_to_target_table,
)
from kfacbench.workloads import WORKLOADS

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
    assert "| suite | workload | setting | seeds | amortized_ms |" in md  # the step cost
    for png in report.glob("*.png"):
        assert f"]({png.name})" in md
    memory = md.split("## Memory")[1].split("## ")[0]  # the state of every cell's method
    assert (
        "| workload | batch | setting | seeds | state MiB | curvature MiB | state vs SGD |"
        in memory
    )
    assert "| curves_ae | 100 | curves_ae sgd bs=100 | 2 |" in memory
    assert memory.count("| 1× |") == 2  # SGD against itself, at both batch sizes


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
            "train_time_s": [30.0] * 6,
            "steps": [300] * 6,
            "median_step_ms": [1.0] * 6,
        }
    )
    table = time_to_target_table(cells).set_index(["workload", "setting"])
    assert (table["amortized_ms"] == 100.0).all()  # 30 s / 300 steps
    assert table.loc[("w1", "k"), "speedup_vs_baseline"] == pytest.approx(2.0)
    assert table.loc[("w2", "k"), "speedup_vs_baseline"] == pytest.approx(0.5)
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


def test_step_cost_divides_by_the_sgd_of_the_same_suite_batch_and_compile_mode() -> None:
    """An eager K-FAC cell of suite "a" is divided by suite a's eager SGD (20 ms/step), not by
    the faster compiled SGD (5) or suite b's SGD (2), which the best-SGD-of-the-workload rule
    took; seeds of a setting are counted once each, and the denominator is named."""

    def cell(suite: str, optimizer: str, train_s: float, median: float, seed: int = 0,
             compile: str = "off") -> dict[str, object]:  # fmt: skip
        setting = f"curves_ae {optimizer} bs=100" + ("" if compile == "off" else f" {compile}")
        return {
            "suite": suite, "workload": "curves_ae", "batch_size": 100, "optimizer": optimizer,
            "setting": setting, "seed": seed, "status": "ok", "compile": compile,
            "train_time_s": train_s, "steps": 100, "median_step_ms": median,
        }  # fmt: skip

    cells = pd.DataFrame(
        [
            cell("a", "kfac", 10.0, 30.0),
            cell("a", "kfac", 12.0, 32.0, seed=1),
            cell("a", "sgd", 2.0, 20.0),
            cell("a", "sgd", 0.5, 5.0, compile="default"),
            cell("b", "sgd", 0.2, 2.0),
        ]
    )
    table = step_time_table(ReportData(cells, pd.DataFrame(), pd.DataFrame(), None, [], []))
    kfac = table[table["setting"] == "curves_ae kfac bs=100"].iloc[0]
    assert kfac["seeds"] == 2 and kfac["amortized_ms"] == 110.0
    assert kfac["vs"] == "curves_ae sgd bs=100"
    assert kfac["vs_sgd"] == pytest.approx(110.0 / 20.0)
    assert kfac["vs_sgd_median"] == pytest.approx(31.0 / 20.0)
    compiled = table[table["setting"] == "curves_ae sgd bs=100 default"].iloc[0]
    assert compiled["vs_sgd"] == 1.0  # divided by itself: the only compiled SGD of its suite


def test_another_baseline_divides_the_speedups_and_step_costs() -> None:
    """A transformer's baseline is AdamW: with ``baseline="adamw"`` each speed-up is the best
    AdamW setting's time to target over the setting's (not SGD's), each step ratio divides by
    the AdamW of the same suite, and the columns and notes say AdamW."""
    cells = pd.DataFrame(
        {
            "suite": ["m"] * 4,
            "workload": ["text_gpt"] * 4,
            "batch_size": [32] * 4,
            "optimizer": ["adamw", "adamw", "soap", "sgd"],
            "setting": ["a1", "a2", "soap", "sgd"],
            "seed": [0] * 4,
            "status": ["ok"] * 4,
            "time_to_target_s": [150.0, 200.0, 120.0, 60.0],
            "train_time_s": [150.0, 200.0, 120.0, 60.0],
            "steps": [300, 400, 150, 150],
            "median_step_ms": [490.0, 490.0, 780.0, 390.0],
        }
    )
    table = time_to_target_table(cells, "adamw").set_index("setting")
    assert table.loc["soap", "speedup_vs_baseline"] == pytest.approx(150.0 / 120.0)
    assert table.loc["sgd", "speedup_vs_baseline"] == pytest.approx(150.0 / 60.0)
    assert table.loc["a1", "speedup"] == "1.00× (best AdamW)"
    shown = time_to_target_display(time_to_target_table(cells, "adamw"), "adamw")
    assert {"speed-up vs best AdamW", "best AdamW"} <= set(shown.columns)
    assert set(shown["best AdamW"]) == {"a1"}
    data = ReportData(cells, pd.DataFrame(), pd.DataFrame(), None, [], [], baseline="adamw")
    cost = step_time_table(data).set_index("setting")
    assert cost.loc["soap", "vs"] == "a1"  # the cheaper AdamW step: 150 s / 300 = 500 ms
    assert cost.loc["soap", "vs_adamw"] == pytest.approx(800.0 / 500.0)
    assert cost.loc["soap", "vs_adamw_median"] == pytest.approx(780.0 / 490.0)


def test_a_baseline_with_no_cells_is_a_one_line_error_and_writes_nothing(
    report: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run_dir,) = (report.parent / "out" / "r").iterdir()  # sgd and skfac cells
    out = tmp_path / "report"
    assert cli.main(["report", str(run_dir), "-o", str(out), "--baseline", "adamw"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kfacbench: error: --baseline adamw: no adamw cell in these runs")
    assert "\n" not in err and not out.exists()


def test_peer_table_pairs_each_peer_with_its_kfacbench_preset() -> None:
    def cell(  # type: ignore[no-untyped-def]
        optimizer: str,
        median: float,
        train_s: float,
        workload: str = "mnist_ae",
        inv: float = 10.0,
        seed: int = 0,
        compile: str = "off",
        suite: str = "peers",
        damping: float = 1.0,
    ):
        label = f"{workload} {optimizer} bs=1000 inv={inv:g} damping={damping:g}"
        label += ("" if compile == "off" else f" compile={compile}") + f" seed={seed}"
        return {
            "suite": suite,
            "label": label,
            "workload": workload,
            "batch_size": 1000,
            "inv_interval": inv,
            "seed": seed,
            "hparams": json.dumps({"damping": damping, "lr": 0.1}),
            "compile": compile,
            "optimizer": optimizer,
            "status": "ok",
            "median_step_ms": median,
            "train_time_s": train_s,
            "steps": 10,
        }

    cells = pd.DataFrame(
        [
            cell("kfac-fast", 300.0, 4.0),
            cell("kfac-fast", 310.0, 4.2, seed=1),
            cell("asdl-kfac", 200.0, 2.0),
            # Cells the old grouping by (workload, batch, optimizer) pooled into the pair: another
            # T_inv, a compiled one, one from another suite, one whose shared damping differs.
            cell("kfac-fast", 100.0, 1.0, inv=20.0),
            cell("kfac-fast", 90.0, 0.9, compile="default"),
            cell("kfac-fast", 80.0, 0.8, suite="kfac_speed"),
            cell("kfac-fast", 500.0, 5.0, damping=0.1),
            cell("skfac", 100.0, 1.0),  # no asdl-skfac on this workload: no row
            cell("sgd", 50.0, 0.5),
            cell("asdl-skfac", 80.0, 1.0, workload="faces_ae"),  # no skfac there: no row
        ]
    )
    data = ReportData(cells, pd.DataFrame(), pd.DataFrame(), None, [], [])
    table = peer_table(data)
    assert len(table) == 1, table
    row = table.iloc[0]
    assert row["peer"] == "mnist_ae asdl-kfac bs=1000 inv=10 damping=1"
    assert row["kfacbench"] == "mnist_ae kfac-fast bs=1000 inv=10 damping=1"  # inv=10, λ = 1
    assert row["seeds"] == "2 / 1"
    assert row["median_ratio"] == pytest.approx(305.0 / 200.0)  # the median of its two seeds
    assert row["amortized_ratio"] == pytest.approx(410.0 / 200.0)
    assert row["median_step_ms"] == "305 / 200"
    assert row["amortized_ms"] == "410 / 200"
    no_peers = ReportData(
        cells[cells["optimizer"] == "sgd"], pd.DataFrame(), pd.DataFrame(), None, [], []
    )
    assert peer_table(no_peers).empty


def test_loss_bands_cover_only_the_logged_range() -> None:
    runs = [
        pd.DataFrame({"step": [20, 40, 60], "train_loss": [3.0, 2.0, 1.0]}),
        pd.DataFrame({"step": [10, 30, 50], "train_loss": [4.0, 2.0, 0.0]}),
    ]
    grid, med, low, high = median_band(runs, "step")
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


# ---------------------------------------------------------------- reading the report right
def synthetic(cells: list[dict], log_every: float = 5.0) -> ReportData:  # type: ignore[type-arg]
    """A ReportData from cell rows: each cell gets a falling loss curve over its training time
    (one point per ``log_every`` seconds) and two phases, so every figure can be built."""
    frame = pd.DataFrame(cells)
    frame["label"] = frame["setting"] + " seed=" + frame["seed"].astype(str)
    frame["cell_id"] = [f"c{i}" for i in range(len(frame))]
    frame["suite"] = "s"
    curves, phases = [], []
    for row in frame.itertuples():
        times = np.arange(log_every, row.train_time_s + 1e-9, log_every)
        steps = np.arange(1, len(times) + 1) * 10
        curves.append(
            pd.DataFrame(
                {
                    "cell_id": row.cell_id,
                    "step": steps,
                    "train_time_s": times,
                    "train_loss": 100.0 / (1.0 + times / (1.0 + len(row.setting) % 7)),
                }
            )
        )
        phases.append(
            pd.DataFrame(
                {"cell_id": row.cell_id, "phase": ["forward", "update"], "total_s": [1.0, 2.0]}
            )
        )
    return ReportData(
        frame,
        pd.concat(curves, ignore_index=True),
        pd.concat(phases, ignore_index=True),
        None,
        [],
        [],
    )


def cell(
    setting: str,
    optimizer: str,
    batch: int,
    train_s: float,
    ttt: float = math.nan,
    status: str = "ok",
    loss: float = 50.0,
    workload: str = "curves_ae",
    seed: int = 0,
) -> dict:  # type: ignore[type-arg]
    return {
        "workload": workload,
        "optimizer": optimizer,
        "setting": f"{workload} {setting}",
        "batch_size": batch,
        "inv_interval": 20.0 if optimizer != "sgd" else math.nan,
        "seed": seed,
        "status": status,
        "steps": 1000,
        "train_time_s": train_s,
        "time_to_target_s": ttt,
        "median_step_ms": train_s,
        "final_train_loss": loss,
    }


# The quick suite as the issue saw it: K-FAC reached the target at 55.5 s, no SGD setting did in
# its 113 s, SKFAC diverged.
ONLY_KFAC = [
    cell("sgd bs=100 lr=0.003", "sgd", 100, 113.0, loss=60.0),
    cell("sgd bs=100 lr=0.01", "sgd", 100, 113.0, loss=55.0),
    cell("sgd bs=500 lr=0.003", "sgd", 500, 113.0, loss=70.0),
    cell("sgd bs=500 lr=0.01", "sgd", 500, 113.0, loss=65.0),
    cell("kfac bs=500", "kfac", 500, 70.0, ttt=55.5, loss=20.0),
    cell("skfac bs=100", "skfac", 100, 6.0, status="diverged", loss=math.nan),
]


@pytest.fixture
def only_kfac() -> Iterator[Figures]:
    figs = build_figures(synthetic(ONLY_KFAC))
    yield figs
    figs.close()


def drawn(figs: Figures, name: str) -> Figure:
    return next(fig for n, fig, _ in figs.drawn if n == name)


def rgb(color: object) -> tuple[float, ...]:
    return tuple(round(c, 6) for c in to_rgb(color))  # type: ignore[arg-type]


def test_time_to_target_table_when_only_one_method_reaches_the_target() -> None:
    table = time_to_target_table(synthetic(ONLY_KFAC).cells).set_index("setting")
    kfac = table.loc["curves_ae kfac bs=500"]
    assert kfac["outcome"] == "reached" and kfac["time_to_target_s"] == 55.5
    # SGD trained 113 s without reaching it: its time to target is above 113 s.
    assert kfac["speedup"] == (
        f"> {113 / 55.5:.2f}× (SGD did not reach the target in its budget, 113 s)"
    )
    sgd = table.loc["curves_ae sgd bs=500 lr=0.01"]
    assert sgd["outcome"] == "not reached" and math.isnan(sgd["time_to_target_s"])
    assert sgd["train_time_s"] == 113.0
    assert sgd["speedup"].startswith("unknown")
    assert table.loc["curves_ae skfac bs=100", "outcome"] == "diverged"
    shown = time_to_target_display(table.reset_index()).set_index("setting")
    assert shown.loc["curves_ae kfac bs=500", "time to target"] == "55.5 s"
    assert shown.loc["curves_ae sgd bs=100 lr=0.01", "time to target"] == "not reached in 113 s"
    assert shown.loc["curves_ae skfac bs=100", "time to target"] == "diverged after 6.00 s"
    assert shown.loc["curves_ae skfac bs=100", "speed-up vs best SGD"] == "none (diverged)"
    assert not shown.isna().any().any()
    assert "nan" not in shown.to_string().lower()
    # Reached first, then not reached, then failed: the table reads as a ranking.
    outcomes = list(table["outcome"])
    assert outcomes[0] == "reached" and outcomes[-1] == "diverged"


def test_speedup_bounds_with_sgd_budgets_of_different_lengths() -> None:
    cells = synthetic(
        [
            cell("sgd bs=100", "sgd", 100, 30.0),
            cell("sgd bs=500", "sgd", 500, 113.0),
            cell("kfac", "kfac", 500, 70.0, ttt=15.0),
        ]
    ).cells
    kfac = time_to_target_table(cells).set_index("optimizer").loc["kfac"]
    # bs=100 stopped at 30 s: it might have reached the target at 31 s, so the bound is 30/15.
    assert (
        kfac["speedup"] == "> 2.00× (SGD did not reach the target in its budgets, 30.0 s to 113 s)"
    )
    reached = synthetic(
        [cell("sgd", "sgd", 100, 60.0, ttt=40.0), cell("kfac", "kfac", 500, 20.0)]
    ).cells
    table = time_to_target_table(reached).set_index("optimizer")
    assert table.loc["sgd", "speedup"] == "1.00× (best SGD)"
    assert table.loc["kfac", "speedup"] == "< 2.00× (not reached in its budget)"  # 40 / 20


def test_time_to_target_figure_shows_every_setting(only_kfac: Figures) -> None:
    fig = drawn(only_kfac, "time_to_target")
    (ax,) = fig.axes
    bars = {p.get_label(): p for p in ax.patches if isinstance(p, Rectangle)}
    assert len(bars) == len(ONLY_KFAC)  # the losers too, not only K-FAC's bar
    kfac = bars["curves_ae kfac bs=500"]
    assert kfac.get_width() == 55.5 and not kfac.get_hatch()
    sgd = bars["curves_ae sgd bs=100 lr=0.01"]
    assert sgd.get_width() == 113.0 and sgd.get_hatch()  # hatched to its budget
    notes = [t.get_text() for t in ax.texts]
    assert "not reached in 113 s" in notes
    assert "55.5 s: > 2.04× SGD (SGD: not reached in 113 s)" in notes
    assert "diverged after 6.00 s" in notes
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    for text in ax.texts:  # every note lies inside its axes
        box = text.get_window_extent(renderer)
        assert ax.bbox.x0 - 1 <= box.x0 and box.x1 <= ax.bbox.x1 + 1
    assert ax.get_xlim()[1] < 1.6 * 113.0  # the axis ends near the longest bar


def test_an_optimizer_has_one_colour_in_every_figure(only_kfac: Figures) -> None:
    colors = optimizer_colors(["sgd", "kfac", "skfac"])
    # The best setting of each optimizer (K-FAC's only one; SGD's lowest final loss) carries
    # exactly the optimizer's colour, as a line and as a bar.
    best = {"kfac": "curves_ae kfac bs=500", "sgd": "curves_ae sgd bs=100 lr=0.01"}
    loss_ax = drawn(only_kfac, "loss_curves_ae").axes[0]
    lines = {line.get_label(): rgb(line.get_color()) for line in loss_ax.get_lines()}
    ttt_ax = drawn(only_kfac, "time_to_target").axes[0]
    bars = {p.get_label(): p for p in ttt_ax.patches if isinstance(p, Rectangle)}
    scaling = drawn(only_kfac, "scaling_batch_size")
    scaling_lines = [line for ax in scaling.axes for line in ax.get_lines()]
    for optimizer, setting in best.items():
        want = rgb(colors[optimizer])
        assert lines[setting.removeprefix("curves_ae ")] == want
        bar = bars[setting]
        assert rgb(bar.get_edgecolor() if bar.get_hatch() else bar.get_facecolor()) == want
        assert want in {rgb(line.get_color()) for line in scaling_lines}
    assert rgb(bars[best["kfac"]].get_facecolor()) == rgb("#de8f05")  # not seaborn's #c38820
    # SGD's four settings: one hue, four lightnesses, none another optimizer's colour.
    sgd = [rgb(c) for label, c in lines.items() if label.startswith("sgd")]
    assert len(set(sgd)) == 4
    hues = {round(husl.rgb_to_husl(*c)[0]) for c in sgd}
    assert max(hues) - min(hues) <= 2
    assert not set(sgd) & {rgb(c) for o, c in colors.items() if o != "sgd"}
    # Legends are read: their text is as large as the axis labels.
    (legend,) = drawn(only_kfac, "loss_curves_ae").legends
    sizes = {t.get_fontsize() for t in legend.get_texts()}
    assert sizes == {loss_ax.xaxis.label.get_fontsize()}


def test_loss_time_axis_is_logarithmic_when_one_run_is_much_longer(only_kfac: Figures) -> None:
    time_ax, step_ax = drawn(only_kfac, "loss_curves_ae").axes
    # 113 s beside SKFAC's 6 s: linear would squeeze every other curve against the y axis.
    assert time_ax.get_xscale() == "log" and "log scale" in time_ax.get_xlabel()
    assert step_ax.get_xlabel().endswith(f"{step_ax.get_xscale()} scale")  # each axis decides
    even = build_figures(synthetic([c for c in ONLY_KFAC if c["optimizer"] == "sgd"]))
    try:
        ax = drawn(even, "loss_curves_ae").axes[0]
        assert ax.get_xscale() == "linear" and "linear scale" in ax.get_xlabel()
    finally:
        even.close()
    assert not wants_log_axis([(1.0, 20.0), (2.0, 70.0)])  # 3.5×: linear still shows both
    assert wants_log_axis([(1.0, 20.0), (2.0, 113.0)])
    assert not wants_log_axis([(0.0, 1.0), (0.0, 100.0)])  # a curve from 0 cannot be on a log axis


def test_no_performance_profile_of_a_single_workload(only_kfac: Figures) -> None:
    assert "performance_profile" not in {name for name, _, _ in only_kfac.drawn}
    assert (
        "performance profile",
        "needs at least 2 workloads with a target reached; this report has 1",
    ) in only_kfac.omitted
    two = [
        *ONLY_KFAC,
        *(dict(c, workload="faces_ae", setting="faces_ae" + c["setting"][9:]) for c in ONLY_KFAC),
    ]
    figs = build_figures(synthetic(two))
    try:
        (ax,) = drawn(figs, "performance_profile").axes
        assert ax.get_title() == "Performance profile over 2 workloads"
        widths = [line.get_linewidth() for line in ax.get_lines()]
        assert len(set(widths)) == len(widths)  # coinciding curves stay visible
    finally:
        figs.close()


def title_overflow(fig: Figure) -> list[str]:
    """The titles whose rendered extent leaves the figure's horizontal extent."""
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    box = fig.bbox
    return [
        t.get_text()
        for t in title_texts(fig)
        if t.get_window_extent(renderer).x0 < box.x0 - 1
        or t.get_window_extent(renderer).x1 > box.x1 + 1
    ]


def test_titles_fit_their_figures(report: Path, only_kfac: Figures) -> None:
    runs = [
        *(report.parent / "out" / "r").iterdir(),
        *(report.parent / "out" / "p" / "r").iterdir(),
    ]
    real = build_figures(load_runs(runs))
    try:
        assert {"scaling_batch_size", "scaling_inv_interval"} <= {n for n, _, _ in real.drawn}
        for name, fig, _ in [*real.drawn, *only_kfac.drawn]:
            assert title_overflow(fig) == [], name
    finally:
        real.close()
    # The check sees an overlong title, and fit_titles wraps it.
    fig = plt.figure(figsize=(3, 2))
    fig.suptitle("Step time vs batch size (examples) (median over each optimizer's other settings)")
    assert title_overflow(fig)
    fit_titles(fig)
    assert title_overflow(fig) == [] and "\n" in fig.texts[0].get_text()
    plt.close(fig)


def test_documents_say_what_was_left_out_and_print_no_nan(report: Path) -> None:
    md = (report / "summary.md").read_text()
    page = (report / "index.html").read_text()
    why = "performance profile: needs at least 2 workloads with a target reached; this report has"
    assert why in md and why in page
    # 40 steps of CURVES reach no target: no race is drawn, and the report says why.
    ttt_md = md.split("## Time to target")[1].split("## ")[0]
    assert "not drawn for curves_ae: timing-only run (no setting reached the target)" in ttt_md
    assert "| time to target |" not in md and " nan " not in md.lower()
    assert "1 workloads" not in md and "1 workloads" not in page


def test_time_to_target_over_seeds_says_how_many_reached_or_failed() -> None:
    cells = synthetic(
        [
            cell("kfac", "kfac", 500, 70.0, ttt=50.0, seed=0),
            cell("kfac", "kfac", 500, 70.0, seed=1),  # trained 70 s without reaching it
            cell("sgd", "sgd", 100, 80.0, ttt=40.0, seed=0),
            cell("sgd", "sgd", 100, 3.0, status="diverged", seed=1),
        ]
    ).cells
    table = time_to_target_table(cells).set_index("optimizer")
    kfac = table.loc["kfac"]
    assert (kfac["outcome"], kfac["reached_seeds"]) == ("not reached", 1)
    assert kfac["ttt_lower_bound_s"] == 60.0  # median of 50 (reached) and > 70 (not reached)
    shown = time_to_target_display(table.reset_index()).set_index("optimizer")
    assert shown.loc["kfac", "time to target"] == "not reached by 1 of 2 seeds in 70.0 s"
    assert shown.loc["sgd", "time to target"] == "diverged (1 of 2 seeds)"
    assert shown.loc["kfac", "speed-up vs best SGD"].startswith("unknown")  # SGD failed a seed


# ---------------------------------------------------------------- curvature diagnostics
@pytest.fixture(scope="module")
def diagnosed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny `kfacbench run` and `kfacbench diagnose` of the same suite: (run dir, diagnose
    dir)."""
    root = tmp_path_factory.mktemp("diagnosed")
    suite = root / "dg.toml"
    suite.write_text(DIAGNOSE_SUITE.replace("at = [0, 3, 6]", "at = [0, 4]"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(WORKLOADS, "tiny_ae", tiny_workload())
        assert cli.main(["run", str(suite), "--out", str(root / "runs")]) == 0
        assert cli.main(["diagnose", str(suite), "--out", str(root / "d"), "--damping", "0.1"]) == 0
    ((run_dir,), (diag_dir,)) = ((root / "runs" / "dg").iterdir(), (root / "d" / "dg").iterdir())
    return run_dir, diag_dir


def test_a_diagnose_run_is_reported_with_its_figures(
    diagnosed: tuple[Path, Path], tmp_path: Path
) -> None:
    _, diag_dir = diagnosed
    dest = tmp_path / "report"
    assert cli.main(["report", str(diag_dir), "-o", str(dest)]) == 0
    ids = sorted(p.stem.split(".")[0] for p in (diag_dir / "dense").glob("*.s4.npz"))
    assert len(ids) == 2  # sgd and kfac-fast, at their last checkpoint
    expected = {
        "diagnostics_quality_dg",
        *(f"diagnostics_dense_{i}" for i in ids),
        *(f"diagnostics_rank_{i}" for i in ids),
    }
    assert {p.stem for p in dest.glob("*.png")} == expected
    for stem in expected:
        with Image.open(dest / f"{stem}.png") as image:
            image.verify()
    page = (dest / "index.html").read_text()
    assert page.count("<img") == len(expected) and "kfacbench report: dg" in page
    assert "No timed run in this report" in page and "Time to target" not in page
    md = (dest / "summary.md").read_text()
    assert "training loss, time to target, phases, scaling and performance profile: no timed" in md


def test_diagnostic_figures_beside_timed_runs(diagnosed: tuple[Path, Path]) -> None:
    data = load_runs(list(diagnosed))
    figs = build_figures(data)
    try:
        names = {n for n, _, _ in figs.drawn}
        assert {"loss_tiny_ae", "phases", "diagnostics_quality_dg"} <= names
        # A few steps reach no target: a timing-only run, no race drawn.
        assert "time_to_target" not in names and "time to target of tiny_ae" in dict(figs.omitted)
        for name, fig, _ in figs.drawn:
            assert title_overflow(fig) == [], name
        colors = optimizer_colors(["sgd", "kfac-fast"])
        quality = drawn(figs, "diagnostics_quality_dg")
        lines = {line.get_label(): line for line in quality.axes[0].get_lines()}
        assert rgb(lines["gradient"].get_color()) == rgb(colors["sgd"])
        assert rgb(lines["kfac[exact]"].get_color()) == rgb(colors["kfac"])
        assert lines["kfac-exact-damping[exact]"].get_linestyle() == "--"
        dense = next(fig for n, fig, _ in figs.drawn if n.startswith("diagnostics_dense_"))
        titles = [ax.get_title() for ax in dense.axes if ax.get_title()]
        assert len(titles) == 6 and titles[0] == "|F|, exact Fisher"
        assert titles[4].startswith("|F̃⁻¹|, block-diagonal\nerror ")
        assert ", off 1)" in titles[4]  # a block-diagonal inverse has no off-diagonal block
        rank = next(fig for n, fig, _ in figs.drawn if n.startswith("diagnostics_rank_"))
        assert rank.axes[0].get_xscale() == "log"
        assert {line.get_label() for line in rank.axes[0].get_lines()} == {"0", "2"}
    finally:
        figs.close()


def test_a_report_says_which_diagnostics_were_not_measured(
    diagnosed: tuple[Path, Path],
) -> None:
    data = load_runs([diagnosed[0]])
    figs = build_figures(data)
    figs.close()
    assert ("curvature diagnostics", "no diagnose run in this report (kfacbench diagnose)") in (
        figs.omitted
    )
    data = load_runs([diagnosed[1]])
    assert data.diagnostics is not None
    data.diagnostics = data.diagnostics[data.diagnostics["layer"] == "all"]
    figs = build_figures(data)
    figs.close()
    whats = {what for what, _ in figs.omitted}
    assert {"dense Fisher heatmaps", "SKFAC's error against rank"} <= whats


def test_a_damaged_heatmap_file_is_a_one_line_error(
    diagnosed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "dg" / "copy"
    shutil.copytree(diagnosed[1], copy)
    victim = sorted((copy / "dense").glob("*.s4.npz"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert cli.main(["report", str(copy), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{victim}: not a readable heatmap file" in err


def test_claims_open_the_report(diagnosed: tuple[Path, Path], tmp_path: Path) -> None:
    """`report --claims`: summary.md opens with the claims table (each claim with a verdict); a
    claim whose cells are absent says "not run" rather than vanishing; without --claims there is
    no such table."""
    dest = tmp_path / "claims"
    assert cli.main(["report", *map(str, diagnosed), "--claims", "-o", str(dest)]) == 0
    md = (dest / "summary.md").read_text()
    lines = md.splitlines()
    assert lines[0].startswith("# kfacbench report")
    assert lines[2].startswith("Rebuild: `kfacbench report ")  # the header: how to make it again
    assert md.index("## The papers' claims") < md.index("## Runs") < md.index("## Figures")
    assert "- reproduced: at least 3 seeds" in md  # the rules under the table
    assert "| paper | claim | measured | verdict | why |" in md
    assert "| not run | no SKFAC and K-FAC cells |" in md
    assert "curves_ae: K-FAC reaches the target" in md  # the tiny run has no autoencoder: not run
    page = (dest / "index.html").read_text()
    assert page.index("The papers' claims") < page.index("Figures")
    plain = tmp_path / "plain"
    assert cli.main(["report", *map(str, diagnosed), "-o", str(plain)]) == 0
    assert "## The papers' claims" not in (plain / "summary.md").read_text()


def test_loss_legend_sits_below_the_axes_without_the_shared_parts(only_kfac: Figures) -> None:
    """Long setting labels (several optimizers with their hyperparameters) go below the axes,
    where they do not squeeze them, and lose the parts every setting shares."""
    fig = drawn(only_kfac, "loss_curves_ae")
    (legend,) = fig.legends
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    top = legend.get_window_extent(renderer).y1
    assert all(top <= ax.get_tightbbox(renderer).y0 + 1 for ax in fig.axes)
    assert all(ax.get_position().width > 0.3 for ax in fig.axes)
    short, common = short_labels(["w sgd bs=32 lr=0.1", "w adamw bs=32 lr=0.001 wd=0.1"], "w ")
    assert short == {
        "w sgd bs=32 lr=0.1": "sgd lr=0.1",
        "w adamw bs=32 lr=0.001 wd=0.1": "adamw lr=0.001 wd=0.1",
    }
    assert common == "bs=32"
    assert short_labels(["w sgd bs=32"], "w ") == ({"w sgd bs=32": "sgd bs=32"}, "")


def test_the_eval_interval_of_a_reached_target_is_shown() -> None:
    """A time to target is read at evals: the table says when the eval before had not reached
    it, and the figure draws that interval on the bar."""
    data = synthetic(ONLY_KFAC)
    kfac = data.cells["optimizer"] == "kfac"
    data.cells["time_to_target_lo_s"] = np.where(kfac, 44.0, math.nan)
    shown = time_to_target_display(time_to_target_table(data.cells)).set_index("setting")
    assert shown.loc["curves_ae kfac bs=500", "time to target"] == "55.5 s (not yet at 44.0 s)"
    assert shown.loc["curves_ae sgd bs=100 lr=0.01", "time to target"] == "not reached in 113 s"
    figs = build_figures(data)
    try:
        (ax,) = drawn(figs, "time_to_target").axes
        assert (44.0, 55.5) in [tuple(line.get_xdata()) for line in ax.get_lines()]
    finally:
        figs.close()


def test_a_diverged_curve_is_clipped_at_the_divergence_bound_and_marked() -> None:
    cells = [*ONLY_KFAC[:2], cell("sgd bs=100 lr=1", "sgd", 100, 20.0, status="diverged")]
    run = synthetic(cells)
    blown = run.curves["cell_id"] == "c2"
    run.curves.loc[blown, "train_loss"] = np.geomspace(1.0, 1e6, int(blown.sum()))
    run.curves.loc[blown & (run.curves["step"] == run.curves["step"].max()), "train_loss"] = np.inf
    clipped = clip_diverged(run.curves.merge(run.cells[["cell_id", "status"]], on="cell_id"))
    mine = clipped[clipped["cell_id"] == "c2"]["train_loss"]
    assert mine.max() == pytest.approx(DIVERGE_FACTOR * 1.0) and np.isfinite(mine).all()
    # The loop's message names the loss it compared against: that sets the bound.
    run.cells["error"] = ""
    run.cells.loc[run.cells["cell_id"] == "c2", "error"] = (
        "train_loss 1e+06 at step 30 exceeds diverge_factor 10 × the initial loss 2.5"
    )
    named = clip_diverged(run.curves.merge(run.cells[["cell_id", "status", "error"]]))
    assert named[named["cell_id"] == "c2"]["train_loss"].max() == pytest.approx(25.0)
    others = clipped[clipped["cell_id"] != "c2"]
    assert others["train_loss"].equals(run.curves.loc[~blown, "train_loss"].reset_index(drop=True))
    figs = build_figures(run)
    fig = drawn(figs, "loss_curves_ae")
    assert fig.axes[0].get_ylim()[1] < 1e3  # the axis ends near the data, not at 1e6
    assert fig.get_suptitle().endswith("✕: diverged, drawn at the divergence bound)")
    markers = [line for line in fig.axes[0].lines if line.get_marker() == "X"]
    assert len(markers) == 1
    figs.close()


def test_races_and_the_performance_profile_leave_out_what_cannot_be_ranked() -> None:
    cells = [
        *ONLY_KFAC,
        cell("sgd bs=100", "sgd", 100, 50.0, workload="faces_ae"),
        cell("kfac bs=100", "kfac", 100, 50.0, workload="faces_ae"),
        cell("sgd bs=100", "sgd", 100, 50.0, ttt=20.0, workload="mnist_ae"),
        cell("kfac bs=100", "kfac", 100, 1.0, status="error", workload="mnist_ae"),
    ]
    run = synthetic(cells)
    assert not_races(run.cells) == {"faces_ae": "timing-only run (no setting reached the target)"}
    assert errored_workloads(run.cells) == {"mnist_ae"}
    run.cells.loc[run.cells["workload"] == "curves_ae", "data_mode"] = "synthetic"
    assert not_races(run.cells)["curves_ae"] == "timing-only run (synthetic data)"
    figs = build_figures(run)
    omitted = dict(figs.omitted)
    assert omitted["time to target of curves_ae, faces_ae"].startswith("timing-only run")
    assert "ended in an error" in omitted["the performance profile's mnist_ae"]
    figs.close()


def test_the_same_label_in_two_suites_is_two_settings_not_two_seeds() -> None:
    cells = pd.DataFrame(
        {
            "label": ["w sgd bs=1 seed=0", "w sgd bs=1 seed=1", "w sgd bs=1 seed=0"],
            "suite": ["a", "a", "b"],
        }
    )
    assert list(setting_names(cells)) == ["w sgd bs=1 [a]", "w sgd bs=1 [a]", "w sgd bs=1 [b]"]
    one = cells[cells["suite"] == "a"]
    assert list(setting_names(one)) == ["w sgd bs=1", "w sgd bs=1"]  # one suite: no suffix


def test_final_metric_table_ranks_settings_by_their_median_over_seeds() -> None:
    """Accuracy best-first, errors lowest-first; a diverged seed counts as not ok and stays out
    of the median; synthetic-data workloads have no metric and no row."""
    from kfacbench.report.tables import final_metric_table

    def c(workload: str, setting: str, seed: int, metric: str, value: float, **kw: object):
        base = {
            "workload": workload, "setting": setting, "seed": seed, "metric": metric,
            "final_eval_metric": value, "status": "ok", "train_time_s": 10.0 + seed,
            "steps": 100, "final_train_loss": value / 2, "data_mode": "real",
        }  # fmt: skip
        return base | kw

    cells = pd.DataFrame(
        [
            c("r", "a", 0, "accuracy", 0.80), c("r", "a", 1, "accuracy", 0.90),
            c("r", "a", 2, "accuracy", 0.85),
            c("r", "b", 0, "accuracy", 0.95), c("r", "b", 1, "accuracy", 0.10, status="diverged"),
            c("e", "x", 0, "recon_error", 5.0), c("e", "y", 0, "recon_error", 3.0),
            c("s", "z", 0, "recon_error", 1.0, data_mode="synthetic"),
        ]
    )  # fmt: skip
    table = final_metric_table(cells)
    assert list(zip(table["workload"], table["setting"], strict=True)) == [
        ("e", "y"), ("e", "x"), ("r", "b"), ("r", "a"),
    ]  # fmt: skip
    a = table.set_index("setting").loc["a"]
    assert a["final"] == pytest.approx(0.85) and a["range"] == "0.8–0.9"
    assert a["seeds"] == 3 and a["not ok"] == 0 and a["train_s"] == pytest.approx(11.0)
    b = table.set_index("setting").loc["b"]
    assert b["final"] == pytest.approx(0.95) and b["not ok"] == 1 and b["range"] == ""
