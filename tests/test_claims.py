"""The claims table: each verdict follows from the cells, and flips when the numbers do."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from kfacbench.claims import COLUMNS, claims_table
from kfacbench.report import ReportData


def cell(
    cell_id: str,
    workload: str,
    optimizer: str,
    *,
    setting: str = "",
    ttt: float = math.nan,
    trained: float = 100.0,
    step_ms: float = 10.0,
    steps: int = 1000,
    status: str = "ok",
    error: str = "",
    acc: float = math.nan,
    batch: int = 500,
) -> dict[str, object]:
    return {
        "cell_id": cell_id,
        "label": f"{workload} {optimizer} {setting}".strip(),
        "workload": workload,
        "optimizer": optimizer,
        "setting": f"{workload} {optimizer} {setting}".strip(),
        "batch_size": batch,
        "status": status,
        "error": error,
        "steps": steps,
        "train_time_s": trained,
        "time_to_target_s": ttt,
        "median_step_ms": step_ms,
        "final_eval_metric": acc,
    }


def curve(cell_id: str, reached_at: int | None, last: int = 1000) -> list[dict[str, object]]:
    """Evals every 100 steps; recon error 50 until ``reached_at``, then 5 (CURVES' target 10)."""
    return [
        {
            "cell_id": cell_id,
            "step": s,
            "train_time_s": s / 10,
            "train_loss": 1.0,
            "eval_metric": 5.0 if reached_at is not None and s >= reached_at else 50.0,
        }
        for s in range(0, last + 1, 100)
    ]


def data(cells: list[dict[str, object]], curves: list[dict[str, object]], phases=()) -> ReportData:
    return ReportData(
        cells=pd.DataFrame(cells),
        curves=pd.DataFrame(curves),
        phases=pd.DataFrame(list(phases), columns=["cell_id", "phase", "median_ms", "total_s"]),
        kernels=None,
        envs=[],
        suites=[],
    )


def verdicts(table: pd.DataFrame, text: str) -> list[str]:
    return list(table.loc[table["claim"].str.contains(text, regex=False), "verdict"])


def autoencoder_run(kfac_ttt: float, sgd_ttt: float) -> ReportData:
    cells = [
        cell("k", "curves_ae", "kfac", ttt=kfac_ttt, step_ms=60.0),
        cell("t", "curves_ae", "kfac-tridiag", ttt=kfac_ttt, step_ms=90.0),
        cell("s1", "curves_ae", "sgd", setting="lr=0.01", ttt=sgd_ttt, trained=300.0),
        cell("s2", "curves_ae", "sgd", setting="lr=0.1", trained=300.0),
        cell("m", "mnist_ae", "kfac", status="error", error="FileNotFoundError: no MNIST\nmore"),
    ]
    curves = curve("k", 300) + curve("t", 200) + curve("s1", 900) + curve("s2", None)
    return data(cells, curves)


def test_kfac_sooner_than_every_sgd_setting_is_reproduced() -> None:
    table = claims_table(autoencoder_run(kfac_ttt=30.0, sgd_ttt=90.0))
    assert list(table.columns) == list(COLUMNS)
    assert verdicts(table, "curves_ae: K-FAC reaches") == ["reproduced"]
    row = table[table["claim"].str.startswith("curves_ae: K-FAC")].iloc[0]
    assert "3.00×" in row["measured"] and "K-FAC 300, SGD 900" in row["measured"]
    # MNIST's training files are missing: said, with the cell's first error line.
    mnist = table[table["claim"].str.startswith("mnist_ae")].iloc[0]
    assert (
        mnist["verdict"] == "not run" and "no MNIST" in mnist["why"] and "more" not in mnist["why"]
    )
    assert verdicts(table, "faces_ae: K-FAC") == ["not run"]


def test_an_sgd_setting_sooner_than_kfac_is_not_reproduced() -> None:
    table = claims_table(autoencoder_run(kfac_ttt=120.0, sgd_ttt=90.0))
    assert verdicts(table, "curves_ae: K-FAC reaches") == ["not reproduced"]


@pytest.mark.parametrize(("kfac_final", "verdict"), [(15.0, "partly"), (25.0, "not reproduced")])
def test_when_neither_reaches_the_target_the_final_metrics_decide(
    kfac_final: float, verdict: str
) -> None:
    cells = [
        cell("k", "curves_ae", "kfac", trained=240.0, acc=kfac_final),
        cell("s1", "curves_ae", "sgd", setting="lr=0.01", trained=240.0, acc=17.6),
        cell("s2", "curves_ae", "sgd", setting="lr=0.1", trained=239.0, acc=23.0),
    ]
    curves = curve("k", None) + curve("s1", None) + curve("s2", None)
    table = claims_table(data(cells, curves))
    assert verdicts(table, "curves_ae: K-FAC reaches") == [verdict]
    row = table[table["claim"].str.startswith("curves_ae: K-FAC")].iloc[0]
    assert "(lr=0.01)" not in row["measured"] and "sgd lr=0.01): not reached" in row["measured"]
    assert "(final 17.6)" in row["measured"] and "K-FAC > 1000 (not reached)" in row["measured"]


def test_step_cost_and_tridiagonal_progress() -> None:
    table = claims_table(autoencoder_run(kfac_ttt=30.0, sgd_ttt=90.0))
    # K-FAC 60 ms vs SGD 10 ms: 6× is "several".
    assert verdicts(table, "several times") == ["reproduced"]
    # tridiag reached at step 200, block-diagonal at 300.
    assert verdicts(table, "block-tridiagonal K-FAC makes more progress") == ["reproduced"]


@pytest.mark.parametrize(("skfac_ms", "verdict"), [(10.0, "reproduced"), (70.0, "partly")])
def test_skfac_inverse_time(skfac_ms: float, verdict: str) -> None:
    cells = [
        cell("k", "fashion_mnist_resnet20", "kfac-fast", batch=128),
        cell("s", "fashion_mnist_resnet20", "skfac", batch=128),
    ]
    phases = [("k", "inverse", 100.0, 1.0), ("s", "inverse", skfac_ms, 0.1)]
    table = claims_table(data(cells, curve("k", None) + curve("s", None), phases))
    assert verdicts(table, "inverse is much faster") == [verdict]


@pytest.mark.parametrize(("skfac_acc", "verdict"), [(0.80, "reproduced"), (0.60, "not reproduced")])
def test_skfac_accuracy_against_kfac_over_seeds(skfac_acc: float, verdict: str) -> None:
    w = "fashion_mnist_resnet20"
    cells = []
    for seed, jitter in enumerate((-0.01, 0.0, 0.01)):
        cells += [
            cell(f"k{seed}", w, "kfac-fast", acc=0.80 + jitter, batch=128),
            cell(f"s{seed}", w, "skfac", acc=skfac_acc + jitter, batch=128),
            cell(f"g{seed}", w, "sgd", acc=0.70 + jitter, batch=128),
        ]
    table = claims_table(data(cells, []))
    assert verdicts(table, "accuracy at equal wall-clock") == [verdict]
    bridged = "reproduced" if skfac_acc > 0.70 else "not reproduced"
    assert verdicts(table, "bridges") == [bridged]
    row = table[table["claim"].str.contains("accuracy at equal")].iloc[0]
    assert "(n=3)" in row["measured"]


def test_diagnostics_claims_are_judged_at_the_last_checkpoint() -> None:
    rows = []
    ratios = {
        0: {"gradient": 0.99, "kfac": 0.8, "kfac-tridiag": 0.8, "skfac-sum": 0.8},
        100: {"gradient": 0.2, "kfac": 0.8, "kfac-tridiag": 0.85, "skfac-sum": 0.6},
    }
    for step, by_name in ratios.items():
        for name, ratio in by_name.items():
            rows.append(
                {
                    "suite": "d",
                    "cell_id": "k",
                    "label": "curves_ae kfac bs=500",
                    "optimizer": "kfac",
                    "step": step,
                    "approximation": f"{name}[sampled]",
                    "layer": "all",
                    "metric": "model_ratio",
                    "value": ratio,
                }
            )
    run = data([cell("k", "curves_ae", "kfac")], curve("k", None))
    run.diagnostics = pd.DataFrame(rows)
    table = claims_table(run)
    # At step 0 the gradient scores 0.99 > K-FAC's 0.8; at the last checkpoint 0.2 < 0.8.
    assert verdicts(table, "closer to the exact natural-gradient step") == ["reproduced"]
    assert verdicts(table, "block-tridiagonal inverse approximates") == ["reproduced"]
    assert verdicts(table, "capture the main curvature") == ["partly"]  # 0.6 / 0.8 = 0.75
    row = table[table["claim"].str.contains("capture the main")].iloc[0]
    assert "step 100" in row["measured"] and "skfac-sum ratio 0.60" in row["measured"]
