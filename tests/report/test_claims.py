"""The claims table: each verdict follows from the cells by the stated rules, and flips when
the numbers, the seeds or the grid do."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from kfacbench.report.claims import COLUMNS, RULES, claims_table
from kfacbench.report.data import ReportData

SEEDS = (0, 1, 2)


def cell(
    cell_id: str,
    workload: str,
    optimizer: str,
    *,
    lr: float | None = None,
    seed: int = 0,
    ttt: float = math.nan,
    trained: float = 100.0,
    step_ms: float = 10.0,
    steps: int = 1000,
    status: str = "ok",
    error: str = "",
    acc: float = math.nan,
    batch: int = 500,
) -> dict[str, object]:
    setting = f"{workload} {optimizer}" + (f" lr={lr:g}" if lr is not None else "")
    return {
        "cell_id": cell_id,
        "label": f"{setting} seed={seed}",
        "workload": workload,
        "optimizer": optimizer,
        "setting": setting,
        "seed": seed,
        "hparams": json.dumps({"lr": lr, "momentum": 0.9} if lr is not None else {}),
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


def row(table: pd.DataFrame, text: str) -> pd.Series:
    (index,) = table.index[table["claim"].str.contains(text, regex=False)]
    return table.loc[index]


def autoencoder_run(
    kfac_ttt: float,
    sgd_ttt: float,
    *,
    seeds: tuple[int, ...] = SEEDS,
    lrs: tuple[float, ...] = (0.003, 0.01, 0.03),
    best_lr: float = 0.01,
    sgd_trained: float = 300.0,
    tridiag_at: int = 200,
) -> ReportData:
    """CURVES with K-FAC, tridiagonal K-FAC and an SGD grid whose ``best_lr`` reaches the target
    at ``sgd_ttt`` (NaN: never) and whose other settings never do; seeds jitter by ±1 s."""
    cells, curves = [], []
    for seed in seeds:
        jitter = seed - 1.0
        cells += [
            cell(f"k{seed}", "curves_ae", "kfac", seed=seed, ttt=kfac_ttt + jitter, step_ms=60.0),
            cell(f"t{seed}", "curves_ae", "kfac-tridiag", seed=seed, ttt=kfac_ttt, step_ms=90.0),
        ]
        curves += curve(f"k{seed}", 300) + curve(f"t{seed}", tridiag_at)
        for lr in lrs:
            reached = lr == best_lr and math.isfinite(sgd_ttt)
            cells.append(
                cell(
                    f"s{lr}-{seed}",
                    "curves_ae",
                    "sgd",
                    lr=lr,
                    seed=seed,
                    ttt=sgd_ttt + jitter if reached else math.nan,
                    trained=sgd_ttt + jitter if reached else sgd_trained,
                    acc=20.0 if lr == best_lr else 30.0,
                )
            )
            curves += curve(f"s{lr}-{seed}", 900 if reached else None)
    return data(cells, curves)


KFAC_SOONER = "curves_ae: K-FAC reaches"


def test_kfac_much_sooner_on_three_seeds_inside_a_bracketed_grid_is_reproduced() -> None:
    table, rules = claims_table(autoencoder_run(kfac_ttt=30.0, sgd_ttt=90.0))
    assert list(table.columns) == list(COLUMNS) and rules == RULES
    claim = row(table, KFAC_SOONER)
    assert claim["verdict"] == "reproduced", claim["why"]
    assert "3.00×" in claim["measured"] and "(curves_ae sgd lr=0.01)" in claim["measured"]
    assert "30.0 s (seeds 29.0 s–31.0 s)" in claim["measured"]
    # No cell of the other autoencoders: said, not left out.
    assert row(table, "faces_ae: K-FAC")["verdict"] == "not run"


def test_one_seed_is_only_consistent() -> None:
    table, _ = claims_table(autoencoder_run(kfac_ttt=30.0, sgd_ttt=90.0, seeds=(0,)))
    claim = row(table, KFAC_SOONER)
    assert claim["verdict"] == "consistent" and "K-FAC: 1 seed (< 3)" in claim["why"]


def test_a_best_sgd_at_the_grids_edge_is_only_consistent() -> None:
    table, _ = claims_table(autoencoder_run(kfac_ttt=30.0, sgd_ttt=90.0, best_lr=0.003))
    claim = row(table, KFAC_SOONER)
    assert claim["verdict"] == "consistent"
    assert "lr 0.003 is the grid's smallest" in claim["why"]


def test_a_ratio_below_much_sooner_is_only_consistent() -> None:
    table, _ = claims_table(autoencoder_run(kfac_ttt=60.0, sgd_ttt=90.0))
    claim = row(table, KFAC_SOONER)
    assert claim["verdict"] == "consistent" and "1.50× is not much sooner" in claim["why"]


@pytest.mark.parametrize(("budget", "verdict"), [(300.0, "reproduced"), (60.0, "consistent")])
def test_sgd_that_never_reached_the_target_must_have_trained_three_times_longer(
    budget: float, verdict: str
) -> None:
    table, _ = claims_table(autoencoder_run(kfac_ttt=30.0, sgd_ttt=math.nan, sgd_trained=budget))
    claim = row(table, KFAC_SOONER)
    assert claim["verdict"] == verdict, claim["why"]
    if verdict == "consistent":
        assert "SGD trained only 1.94× K-FAC's time to target" in claim["why"]  # 60 / 31


def test_an_sgd_setting_sooner_than_kfac_is_not_reproduced() -> None:
    table, _ = claims_table(autoencoder_run(kfac_ttt=120.0, sgd_ttt=90.0))
    assert row(table, KFAC_SOONER)["verdict"] == "not reproduced"


def test_a_failed_kfac_cell_says_why_with_its_first_error_line() -> None:
    cells = [
        cell("m", "mnist_ae", "kfac", status="error", error="FileNotFoundError: no MNIST\nmore"),
        cell("s", "mnist_ae", "sgd", lr=0.01),
    ]
    table, _ = claims_table(data(cells, curve("m", None) + curve("s", None)))
    mnist = row(table, "mnist_ae: K-FAC")
    assert mnist["verdict"] == "not run" and "no MNIST" in mnist["why"]
    assert "more" not in mnist["why"]


@pytest.mark.parametrize(
    ("kfac_final", "verdict"), [(15.0, "consistent"), (25.0, "not reproduced")]
)
def test_when_neither_reaches_the_target_the_final_metrics_decide(
    kfac_final: float, verdict: str
) -> None:
    cells, curves = [], []
    for seed in SEEDS:
        cells += [
            cell(f"k{seed}", "curves_ae", "kfac", seed=seed, trained=240.0, acc=kfac_final),
            cell(f"a{seed}", "curves_ae", "sgd", lr=0.01, seed=seed, trained=240.0, acc=17.6),
            cell(f"b{seed}", "curves_ae", "sgd", lr=0.1, seed=seed, trained=239.0, acc=23.0),
        ]
        curves += curve(f"k{seed}", None) + curve(f"a{seed}", None) + curve(f"b{seed}", None)
    table, _ = claims_table(data(cells, curves))
    claim = row(table, KFAC_SOONER)
    assert claim["verdict"] == verdict
    assert "(curves_ae sgd lr=0.01): not reached" in claim["measured"]
    assert "final 17.6" in claim["measured"]


def test_step_cost_is_amortized_and_names_the_refresh() -> None:
    run = autoencoder_run(kfac_ttt=30.0, sgd_ttt=90.0)
    # K-FAC: 100 s / 1000 steps = 100 ms amortized, of which the refreshes 40 s.
    run.cells.loc[run.cells["optimizer"] == "kfac", "train_time_s"] = 100.0
    kfac_ids = run.cells.loc[run.cells["optimizer"] == "kfac", "cell_id"]
    run.phases = pd.DataFrame(
        [(c, "inverse", 800.0, 40.0) for c in kfac_ids],
        columns=["cell_id", "phase", "median_ms", "total_s"],
    )
    run.cells.loc[run.cells["optimizer"] == "sgd", ["train_time_s", "steps"]] = (30.0, 1000)
    table, _ = claims_table(run)
    claim = row(table, "several times")
    assert "amortized 100.0 ms (K-FAC, 3 seeds) / 30.0 ms" in claim["measured"]
    assert (
        "= 3.3×" in claim["measured"] and "a refresh 800 ms, 40% of training" in claim["measured"]
    )
    assert claim["verdict"] == "reproduced"
    run.cells.loc[run.cells["optimizer"] == "kfac", "train_time_s"] = 400.0  # 13×
    table, _ = claims_table(run)
    assert row(table, "several times")["verdict"] == "not reproduced"


@pytest.mark.parametrize(
    ("tridiag_at", "verdict"), [(100, "reproduced"), (200, "not resolved"), (400, "not resolved")]
)
def test_steps_to_target_must_differ_by_more_than_the_eval_interval(
    tridiag_at: int, verdict: str
) -> None:
    # Block-diagonal reaches the target at step 300, evals every 100 steps.
    run = autoencoder_run(kfac_ttt=30.0, sgd_ttt=90.0, tridiag_at=tridiag_at)
    claim = row(claims_table(run)[0], "block-tridiagonal K-FAC makes more progress")
    assert claim["verdict"] == verdict, claim["why"]
    assert "evals every 100 steps" in claim["measured"]


@pytest.mark.parametrize(
    ("skfac_ms", "verdict"),
    [(10.0, "reproduced"), (70.0, "consistent"), (120.0, "not reproduced")],
)
def test_skfac_inverse_time(skfac_ms: float, verdict: str) -> None:
    cells, phases = [], []
    for seed in SEEDS:
        cells += [
            cell(f"k{seed}", "fashion_mnist_resnet20", "kfac-fast", seed=seed, batch=128),
            cell(f"s{seed}", "fashion_mnist_resnet20", "skfac", seed=seed, batch=128),
        ]
        phases += [
            (f"k{seed}", "inverse", 100.0 + seed, 1.0),
            (f"s{seed}", "inverse", skfac_ms, 0.1),
        ]
    table, _ = claims_table(data(cells, [], phases))
    assert row(table, "inverse is much faster")["verdict"] == verdict


@pytest.mark.parametrize(
    ("skfac_acc", "comparable", "bridged"),
    [(0.80, "reproduced", "reproduced"), (0.71, "not reproduced", "consistent")],
)
def test_skfac_accuracy_against_kfac_and_sgd_over_seeds(
    skfac_acc: float, comparable: str, bridged: str
) -> None:
    w = "fashion_mnist_resnet20"
    cells = []
    for seed, jitter in zip(SEEDS, (-0.01, 0.0, 0.01), strict=True):
        cells += [
            cell(f"k{seed}", w, "kfac-fast", seed=seed, acc=0.80 + jitter, batch=128),
            cell(f"s{seed}", w, "skfac", seed=seed, acc=skfac_acc + jitter, batch=128),
            cell(f"g{seed}", w, "sgd", seed=seed, acc=0.70 + jitter, batch=128),
        ]
    table, _ = claims_table(data(cells, []))
    claim = row(table, "accuracy at equal wall-clock")
    assert claim["verdict"] == comparable and "(n=3, ± sd)" in claim["measured"]
    assert row(table, "bridges")["verdict"] == bridged


def diagnostics(ratios: dict[int, dict[str, float]], seeds: tuple[int, ...]) -> pd.DataFrame:
    rows = []
    for seed in seeds:
        for step, by_name in ratios.items():
            for name, ratio in by_name.items():
                rows.append(
                    {
                        "suite": "d",
                        "cell_id": f"k{seed}",
                        "label": f"curves_ae kfac bs=500 seed={seed}",
                        "optimizer": "kfac",
                        "step": step,
                        "approximation": f"{name}[sampled]",
                        "layer": "all",
                        "metric": "model_ratio",
                        "value": ratio + 0.01 * seed,
                    }
                )
    return pd.DataFrame(rows)


@pytest.mark.parametrize(("seeds", "verdict"), [(SEEDS, "reproduced"), ((0,), "consistent")])
def test_diagnostics_claims_are_judged_at_the_last_checkpoint_over_seeds(
    seeds: tuple[int, ...], verdict: str
) -> None:
    ratios = {
        0: {"gradient": 0.99, "kfac": 0.8, "kfac-tridiag": 0.8, "skfac-sum": 0.8},
        100: {"gradient": 0.2, "kfac": 0.8, "kfac-tridiag": 0.85, "skfac-sum": 0.5},
    }
    run = data([cell("k0", "curves_ae", "kfac")], curve("k0", None))
    run.diagnostics = diagnostics(ratios, seeds)
    table, _ = claims_table(run)
    # At step 0 the gradient scores 0.99 > K-FAC's 0.8; at the last checkpoint 0.2 < 0.8.
    assert row(table, "closer to the exact natural-gradient step")["verdict"] == verdict
    assert row(table, "block-tridiagonal inverse approximates")["verdict"] == verdict
    skfac = row(table, "capture the main curvature")
    assert skfac["verdict"] == "not reproduced"  # 0.5 / 0.8 of K-FAC's reduction
    assert "step 100" in skfac["measured"] and "K-FAC's effective damping" in skfac["measured"]
