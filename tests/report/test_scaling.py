"""The cost-growth fit: slopes with their intervals, crossovers, per-step costs, throughput."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from kfacbench.report.data import ReportData
from kfacbench.report.document import growth_section
from kfacbench.report.plotting import Figures
from kfacbench.report.scaling import (
    AMORTIZED,
    crossings,
    crossover_table,
    crossover_text,
    fit_power,
    gemm_rates,
    per_step_ms,
    phase_costs,
    slope_table,
    throughput,
)
from kfacbench.report.scaling_figures import cost_growth_figures

WIDTHS = [256, 512, 1024, 2048]


def test_an_exact_power_law_has_its_exponent_and_no_error() -> None:
    x = np.array([256.0, 512, 1024, 2048, 4096])
    fit = fit_power(x, 3e-7 * x**3)
    assert fit.slope == pytest.approx(3.0) and fit.stderr == pytest.approx(0.0, abs=1e-9)
    assert math.exp(fit.intercept) == pytest.approx(3e-7)
    assert fit.at(1000.0) == pytest.approx(3e-7 * 1e9)


def test_the_slope_and_its_error_match_a_textbook_regression() -> None:
    x = [1.0, 2.0, 4.0, 8.0, 16.0]
    y = [1.1, 3.9, 17.0, 60.0, 270.0]
    fit = fit_power(x, y)
    ref = stats.linregress(np.log(x), np.log(y))
    assert fit.slope == pytest.approx(ref.slope)
    assert fit.stderr == pytest.approx(ref.stderr)
    t = stats.t.ppf(0.975, 3)  # n - 2 = 3 degrees of freedom
    assert (fit.lo, fit.hi) == pytest.approx(
        (ref.slope - t * ref.stderr, ref.slope + t * ref.stderr)
    )


def test_a_noisy_cube_is_fitted_near_three_inside_its_interval() -> None:
    rng = np.random.default_rng(0)
    x = np.repeat([256.0, 512, 1024, 2048], 3)
    fit = fit_power(x, 2e-8 * x**3 * np.exp(rng.normal(0, 0.1, x.size)))
    assert fit.lo < 3.0 < fit.hi and abs(fit.slope - 3.0) < 0.1 and fit.points == 12


def test_the_interval_covers_the_true_slope_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(1)
    x = np.array([128.0, 256, 512, 1024, 2048])
    hits = 0
    for _ in range(400):
        fit = fit_power(x, x**2 * np.exp(rng.normal(0, 0.3, x.size)))
        hits += fit.lo <= 2.0 <= fit.hi
    assert 0.92 <= hits / 400 <= 0.98


@pytest.mark.parametrize(
    ("x", "y"), [([1, 2, 2, 1], [1, 2, 3, 4]), ([1, 2, 3], [1, 0, 2]), ([1, 2, 3], [1, 2])]
)
def test_a_fit_needs_three_distinct_positive_points(x: list[float], y: list[float]) -> None:
    with pytest.raises(ValueError):
        fit_power(x, y)


def test_two_power_laws_cross_where_the_algebra_says() -> None:
    # 1e-6·W³ = 1e-2·W  ⇔  W² = 1e4  ⇔  W = 100
    x = np.array([32.0, 64, 128, 256, 512])
    assert crossings(x, 1e-6 * x**3, 1e-2 * x) == [pytest.approx(100.0)]
    text = crossover_text("refresh", "the rest", "width", list(x), 1e-6 * x**3, 1e-2 * x)
    assert text == "refresh overtakes the rest at W ≈ 100"
    text = crossover_text("a", "b", "batch_size", list(x), 1e-2 * x, 1e-6 * x**3)
    assert text == "a falls below b at batch ≈ 100"


def test_a_crossing_outside_the_range_is_extrapolated_from_the_fits() -> None:
    # W³ / 4096² = W  ⇔  W = 4096, beyond 2048
    x = np.array(WIDTHS, dtype=float)
    text = crossover_text("refresh", "the rest", "width", list(x), x**3 / 4096**2, x)
    assert text == (
        "refresh stays below the rest over W 256–2048: not within the measured range"
        " (the fitted lines meet at W ≈ 4,096, extrapolated)"
    )


def test_a_crossing_far_beyond_the_range_is_not_extrapolated() -> None:
    # 1e-12·W³ = W  ⇔  W = 10^6: over 4× beyond 2048
    x = np.array(WIDTHS, dtype=float)
    text = crossover_text("refresh", "the rest", "width", list(x), 1e-12 * x**3, x)
    assert text == "refresh stays below the rest over W 256–2048: not within the measured range"


def test_a_phase_run_at_refreshes_counts_once_per_t_inv() -> None:
    assert per_step_ms(8.0, calls=20, steps=20, inv_interval=10) == 8.0
    assert per_step_ms(50.0, calls=4, steps=20, inv_interval=10) == 5.0
    assert per_step_ms(50.0, calls=4, steps=20, inv_interval=0) == 10.0


def cell(cid: str, optimizer: str, width: int, **kw: object) -> dict:
    return {
        "cell_id": cid,
        "suite": "scale",
        "workload": f"mlp_{width}",
        "optimizer": optimizer,
        "hparams": json.dumps({"inverse_method": "cholesky"} if optimizer == "kfac-fast" else {}),
        "inv_interval": math.nan if optimizer == "sgd" else 10,
        "batch_size": 128,
        "seed": 0,
        "status": "ok",
        "steps": 20,
        "device_name": "cpu-x",
        "device_kind": "cpu",
        "method_info": "{}",
        "compile": "off",
    } | kw


def phase(cid: str, name: str, calls: int, ms: float) -> dict:
    return {"cell_id": cid, "phase": name, "calls": calls, "median_ms": ms}


# K-FAC's refresh per step 5e-7·W³ against the rest 5e-4·W²: equal at W = 1000.
A, B = 5e-6, 1e-4


def kfac_run() -> tuple[pd.DataFrame, pd.DataFrame]:
    cells, phases = [], []
    for w in WIDTHS:
        cells.append(cell(f"k{w}", "kfac-fast", w))
        cells.append(cell(f"s{w}", "sgd", w))
        for name in ("forward", "backward", "curvature", "precondition", "update"):
            phases.append(phase(f"k{w}", name, 20, B * w**2))
        phases.append(phase(f"k{w}", "inverse", 4, A * w**3))
        phases.append(phase(f"k{w}", "step", 20, 1.0))  # the whole step: not a phase of its own
        phases.append(phase(f"s{w}", "forward", 20, 2e-5 * w**2))
    cells.append(cell("other", "sgd", 256, workload="curves_ae"))  # not a family: left out
    cells.append(cell("bad", "sgd", 4096, status="error"))  # not ok: left out
    return pd.DataFrame(cells), pd.DataFrame(phases)


def test_slopes_per_phase_beside_the_flop_model() -> None:
    costs = phase_costs(*kfac_run())
    assert set(costs["cell_id"]) == {f"{o}{w}" for o in "ks" for w in WIDTHS}
    assert "step" not in set(costs["phase"])
    k = costs[costs["cell_id"] == "k1024"].set_index("phase")
    assert k.loc["inverse", "step_ms"] == pytest.approx(A * 1024**3 / 10)
    assert k.loc[AMORTIZED, "step_ms"] == pytest.approx(5 * B * 1024**2 + A * 1024**3 / 10)
    table = slope_table(costs).set_index(["method", "phase"])
    assert set(table["axis"]) == {"W"} and set(table["fixed"]) == {"batch 128"}
    assert table.loc[("kfac-fast T_inv 10", "inverse"), "slope"] == pytest.approx(3.0)
    assert table.loc[("kfac-fast T_inv 10", "forward"), "slope"] == pytest.approx(2.0)
    assert table.loc[("sgd", "forward"), "slope"] == pytest.approx(2.0)
    # The model: four (W+1)×W layers and a 65-wide input grow a little slower than W² and W³.
    assert 1.9 < table.loc[("sgd", "forward"), "model_slope"] < 2.0
    assert 2.9 < table.loc[("kfac-fast T_inv 10", "inverse"), "model_slope"] < 3.0
    amortized = table.loc[("kfac-fast T_inv 10", AMORTIZED)]
    assert 2.0 < amortized["slope"] < 3.0 and amortized["points"] == 4


def test_the_refresh_overtakes_the_rest_where_the_power_laws_meet() -> None:
    table = crossover_table(phase_costs(*kfac_run()))
    assert list(table["crossover"]) == ["refresh vs the rest"]
    assert table["finding"].iloc[0] == (
        "kfac-fast T_inv 10's refresh / T_inv overtakes the rest of its step at W ≈ 1,000"
    )


def test_skfac_stops_beating_kfac_where_their_steps_meet() -> None:
    # SKFAC's step c·W^1.5 against K-FAC's 1e-3·W²: equal at W = (c / 1e-3)² = 640.
    c = 1e-3 * math.sqrt(640.0)
    cells, phases = [], []
    for w in WIDTHS:
        cells += [cell(f"k{w}", "kfac-fast", w), cell(f"q{w}", "skfac", w)]
        phases += [
            phase(f"k{w}", "forward", 20, 1e-3 * w**2),
            phase(f"q{w}", "forward", 20, c * w**1.5),
        ]
    table = crossover_table(phase_costs(pd.DataFrame(cells), pd.DataFrame(phases)))
    found = table.loc[table["crossover"] == "SKFAC vs K-FAC", "finding"]
    assert list(found) == ["skfac T_inv 10's step falls below kfac-fast T_inv 10's at W ≈ 640"]


def test_runs_of_other_workloads_have_no_costs() -> None:
    cells, phases = kfac_run()
    cells = cells.assign(workload="curves_ae")
    costs = phase_costs(cells, phases)
    assert costs.empty and slope_table(costs).empty and crossover_table(costs).empty


def test_throughput_is_the_model_flops_over_the_time() -> None:
    costs = phase_costs(*kfac_run())
    rated = throughput(costs).set_index(["cell_id", "phase"])
    # mlp_256's forward: 2·batch·Σ d_in·d_out with the bias as an input (65, 4×257, 257 → 10)
    flops = 2 * 128 * (65 * 256 + 4 * 257 * 256 + 257 * 10)
    ms = 2e-5 * 256**2
    assert rated.loc[("s256", "forward"), "gflops"] == pytest.approx(flops / (ms / 1e3) / 1e9)
    assert ("k256", "update") in rated.index and not rated["gflops"].isna().any()


def test_the_gemm_rate_is_the_median_per_device() -> None:
    envs = [
        {"device_name": "gpu", "gemm_gflops": 100.0},
        {"device_name": "gpu", "gemm_gflops": 300.0},
        {"device_name": "gpu", "gemm_gflops": 200.0},
        {"device_name": "cpu"},  # a run from before the rate was measured
    ]
    assert gemm_rates(envs) == {"gpu": 200.0}


def report_data(cells: pd.DataFrame, phases: pd.DataFrame) -> ReportData:
    envs = [{"device_name": "cpu-x", "gemm_gflops": 50.0}]
    return ReportData(cells, pd.DataFrame(), phases, None, envs, [])


def test_a_swept_family_gets_its_section_and_figures() -> None:
    data = report_data(*kfac_run())
    figs = Figures()
    cost_growth_figures(data, figs)
    try:
        assert [name for name, _, _ in figs.drawn] == ["cost_growth_width", "throughput_width"]
        assert figs.omitted == []
        time_fig, rate_fig = (fig for _, fig, _ in figs.drawn)
        (sgd,) = (ax for ax in time_fig.axes if ax.get_title(loc="left").startswith("sgd"))
        # dotted: the forward's model line, then the amortized step's (phases in order)
        model, _ = (ln for ln in sgd.get_lines() if ln.get_linestyle() == ":")
        # SGD's forward FLOPs at the GEMM rate of 50 GFLOP/s, in ms
        want = [2 * 128 * (65 * w + 4 * (w + 1) * w + (w + 1) * 10) / 50e9 * 1e3 for w in WIDTHS]
        assert list(model.get_xdata()) == WIDTHS
        assert list(model.get_ydata()) == pytest.approx(want)
        for ax in rate_fig.axes[:2]:  # the modelled methods, each with the GEMM rate's line
            assert any(list(ln.get_ydata()) == [50.0, 50.0] for ln in ax.get_lines())
    finally:
        figs.close()
    section = growth_section(data)
    assert section is not None and section.title == "How the cost grows"
    assert section.table is not None
    assert list(section.table["method"]) == ["kfac-fast T_inv 10", "sgd"]
    assert section.table["inverse"].iloc[0] == "3.00 [3.00, 3.00] (3.00)"
    assert section.items[-1] == "cpu-x: float32 GEMM at 50 GFLOP/s, measured before the cells"
    assert section.items[0].startswith("W (mlp, batch 128): kfac-fast T_inv 10's refresh")


def test_other_runs_get_neither_and_too_few_points_say_why() -> None:
    cells, phases = kfac_run()
    data = report_data(cells.assign(workload="curves_ae"), phases)
    figs = Figures()
    cost_growth_figures(data, figs)
    assert figs.drawn == [] and figs.omitted == [] and growth_section(data) is None
    two = cells[cells["workload"].isin(["mlp_256", "mlp_512"])]
    cost_growth_figures(report_data(two, phases), figs)
    assert figs.drawn == [] and figs.omitted == [
        (
            "cost growth per phase",
            "needs at least 3 widths, batch sizes or sequence lengths of one family with the"
            " other axes held",
        )
    ]
