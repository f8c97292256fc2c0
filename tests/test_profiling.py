"""Profiles: traces written by torch.profiler in the test, the kernels table built from them."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import torch
from shared_suites import PROFILED

from kfacbench import cli
from kfacbench.core.timing import ANNOTATION_PREFIX
from kfacbench.errors import KfacbenchError
from kfacbench.optim import METHODS
from kfacbench.profiling import CATEGORIES, categorize, kernel_rows, profile_cell
from kfacbench.runner import DataCache, RunOptions, run_cell
from kfacbench.runs.rundir import load_tables
from kfacbench.runs.schema import KERNEL_COLUMNS
from kfacbench.suite import Cell, ProfileWindow, parse_suite
from kfacbench.workloads import WORKLOADS

CPU = torch.device("cpu")

SUITE = PROFILED.format(name="p")


def cells() -> tuple[Cell, ...]:
    data = tomllib.loads(SUITE)
    return parse_suite(
        data, source="p.toml", workloads=WORKLOADS, methods=METHODS, name_default="p"
    ).cells


@pytest.mark.parametrize(
    ("name", "category"),
    [
        ("aten::addmm", "gemm"),
        ("aten::mm", "gemm"),
        ("ampere_sgemm_128x64_nn", "gemm"),
        ("aten::linalg_eigh", "solver"),
        ("aten::linalg_cholesky_ex", "solver"),
        ("syevd_kernel", "solver"),
        ("void sytrd_lower_kernel<float>(...)", "solver"),
        ("void stedc_merge_kernel<float>", "solver"),
        ("ormtr_gemm_kernel", "solver"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "gemm"),
        ("void at::native::multi_tensor_apply_kernel<TensorListMetadata<2>, ...>", "elementwise"),
        ("aten::copy_", "copy/memset"),
        ("Memcpy HtoD (Pageable -> Device)", "copy/memset"),
        ("aten::sum", "reduction"),
        ("void at::native::vectorized_elementwise_kernel<4, ...>", "elementwise"),
        ("aten::sigmoid_backward", "elementwise"),
        ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"),
        ("aten::bernoulli_", "other"),
    ],
)
def test_categories(name: str, category: str) -> None:
    assert categorize(name) == category
    assert category in CATEGORIES


def test_self_times_and_phase_attribution_on_a_hand_made_trace(tmp_path: Path) -> None:
    """Nested operators count by self time; an op belongs to the phase range containing it; the
    rest of each phase is '(outside operators)', so shares sum to 1."""
    ann = "user_annotation"
    events = [
        {"ph": "X", "cat": ann, "name": "ProfilerStep#3", "ts": 0, "dur": 100, "tid": 1},
        {"ph": "X", "cat": ann, "name": ANNOTATION_PREFIX + "step", "ts": 0, "dur": 95, "tid": 1},
        {
            "ph": "X",
            "cat": ann,
            "name": ANNOTATION_PREFIX + "forward",
            "ts": 0,
            "dur": 60,
            "tid": 1,
        },
        {
            "ph": "X",
            "cat": ann,
            "name": ANNOTATION_PREFIX + "update",
            "ts": 70,
            "dur": 20,
            "tid": 1,
        },
        {"ph": "X", "cat": "cpu_op", "name": "aten::linear", "ts": 5, "dur": 40, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::addmm", "ts": 10, "dur": 30, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "ts": 12, "dur": 5, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::add_", "ts": 75, "dur": 10, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::add_", "ts": 86, "dur": 2, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::index", "ts": 96, "dur": 3, "tid": 1},
    ]
    trace = tmp_path / "t.pt.trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    rows = {(r["phase"], r["kernel"]): r for r in kernel_rows(trace, "c")}
    assert rows[("forward", "aten::linear")]["total_ms"] == pytest.approx(0.010)  # 40 - 30
    assert rows[("forward", "aten::addmm")]["total_ms"] == pytest.approx(0.025)  # 30 - 5
    assert rows[("forward", "aten::addmm")]["category"] == "gemm"
    assert rows[("forward", "aten::copy_")]["total_ms"] == pytest.approx(0.005)
    assert rows[("update", "aten::add_")]["calls"] == 2
    assert rows[("update", "aten::add_")]["total_ms"] == pytest.approx(0.012)
    assert rows[("forward", "(outside operators)")]["total_ms"] == pytest.approx(0.020)
    assert rows[("(none)", "aten::index")]["share"] == pytest.approx(0.03)
    assert rows[("(none)", "(outside operators)")]["total_ms"] == pytest.approx(0.017)
    assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)


def test_cuda_kernels_go_to_the_phase_that_launched_them(tmp_path: Path) -> None:
    """Device kernels run after their launch (asynchronously): the launching runtime call, found
    by correlation id, decides the phase, not the kernel's own time."""
    ann = "user_annotation"
    events = [
        {"ph": "X", "cat": ann, "name": "ProfilerStep#3", "ts": 0, "dur": 100, "tid": 1},
        # Kineto's GPU-side copy of the step range: not a second step
        {"ph": "X", "cat": "gpu_user_annotation", "name": "ProfilerStep#3", "ts": 3, "dur": 95},
        {
            "ph": "X",
            "cat": ann,
            "name": ANNOTATION_PREFIX + "inverse",
            "ts": 0,
            "dur": 30,
            "tid": 1,
        },
        {
            "ph": "X",
            "cat": ann,
            "name": ANNOTATION_PREFIX + "update",
            "ts": 40,
            "dur": 50,
            "tid": 1,
        },
        {
            "ph": "X",
            "cat": "cuda_runtime",
            "name": "cudaLaunchKernel",
            "ts": 5,
            "dur": 2,
            "args": {"correlation": 7},
        },
        {
            "ph": "X",
            "cat": "cuda_runtime",
            "name": "cudaLaunchKernel",
            "ts": 45,
            "dur": 2,
            "args": {"correlation": 8},
        },
        # launched in inverse, runs during update on the device
        {
            "ph": "X",
            "cat": "kernel",
            "name": "syevd_kernel",
            "ts": 50,
            "dur": 20,
            "args": {"correlation": 7},
        },
        {
            "ph": "X",
            "cat": "kernel",
            "name": "ampere_sgemm_64x64_nn",
            "ts": 71,
            "dur": 10,
            "args": {"correlation": 8},
        },
        {
            "ph": "X",
            "cat": "gpu_memcpy",
            "name": "Memcpy DtoH",
            "ts": 82,
            "dur": 4,
            "args": {"correlation": 8},
        },
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 44, "dur": 5, "tid": 1},
    ]
    trace = tmp_path / "t.pt.trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    rows = {(r["phase"], r["kernel"]): r for r in kernel_rows(trace, "c")}
    assert {r["device"] for r in rows.values()} == {"cuda"}
    assert rows[("inverse", "syevd_kernel")]["category"] == "solver"
    assert rows[("inverse", "syevd_kernel")]["total_ms"] == pytest.approx(0.020)
    assert rows[("update", "ampere_sgemm_64x64_nn")]["category"] == "gemm"
    assert rows[("update", "Memcpy DtoH")]["category"] == "copy/memset"
    assert ("update", "aten::mm") not in rows  # on CUDA the rows are device work only
    assert rows[("inverse", "(device idle)")]["total_ms"] == pytest.approx(0.010)  # 30 - 20
    assert rows[("update", "(device idle)")]["total_ms"] == pytest.approx(0.036)  # 50 - 14
    assert rows[("(none)", "(device idle)")]["total_ms"] == pytest.approx(0.020)
    assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)


def test_a_profiled_cell_writes_a_trace_and_its_kernels_table(tmp_path: Path) -> None:
    skfac = next(c for c in cells() if c.optimizer == "skfac")
    data = DataCache(RunOptions())
    trace = profile_cell(skfac, CPU, data, tmp_path / "traces", ProfileWindow(1, 1, 3))
    assert trace.parent == tmp_path / "traces" / skfac.id
    assert trace.name.startswith(f"{skfac.id}.") and trace.name.endswith(".pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    steps = [e for e in events if str(e.get("name", "")).startswith("ProfilerStep#")]
    assert len(steps) == 3
    rows = kernel_rows(trace, skfac.id)
    frame = pd.DataFrame(rows)
    assert set(frame["category"]) <= set(CATEGORIES)
    assert {"forward", "backward", "curvature", "inverse", "precondition", "update"} <= set(
        frame["phase"]
    )
    assert frame["share"].sum() == pytest.approx(1.0, abs=1e-6)
    gemm = frame[(frame["phase"] == "forward") & (frame["category"] == "gemm")]
    assert gemm["total_ms"].sum() > 0
    assert (frame[frame["phase"] == "inverse"]["category"] == "solver").any()  # the Cholesky


def test_profiling_leaves_the_timed_results_unchanged(tmp_path: Path) -> None:
    """The profiling pass rebuilds the cell from its config and shares no state with the timed
    run: the same cell trains to the same losses before and after being profiled."""
    skfac = next(c for c in cells() if c.optimizer == "skfac")
    data = DataCache(RunOptions())
    before = run_cell(skfac, CPU, data).result
    profile_cell(skfac, CPU, data, tmp_path, ProfileWindow())
    after = run_cell(skfac, CPU, data).result
    losses = [[row["train_loss"] for row in r.curves[1:]] for r in (before, after)]
    assert losses[0] and losses[0] == losses[1]  # row 0 (before any step) has no train loss


def test_window_validation() -> None:
    with pytest.raises(KfacbenchError, match="wait >= 1"):
        ProfileWindow(wait=0)
    with pytest.raises(KfacbenchError, match=r"p\.toml: profile: .*active >= 1"):
        parse_suite(
            tomllib.loads(SUITE + "[profile]\nactive = 0\n"),
            source="p.toml",
            workloads=WORKLOADS,
            methods=METHODS,
            name_default="p",
        )
    with pytest.raises(KfacbenchError, match=r"profile\.steps"):
        parse_suite(
            tomllib.loads(SUITE + "[profile]\nsteps = 3\n"),
            source="p.toml",
            workloads=WORKLOADS,
            methods=METHODS,
            name_default="p",
        )


def test_run_with_a_profile_option_profiles_after_the_timed_runs(tmp_path: Path) -> None:
    """Same cell ids and the same timed results with and without ``[profile]``; the profiled run
    also has traces and the kernels table."""
    plain, profiled = tmp_path / "plain.toml", tmp_path / "profiled.toml"
    plain.write_text(SUITE)
    profiled.write_text(SUITE + "[profile]\nwait = 1\nwarmup = 1\nactive = 2\n")
    tables = []
    for suite, out in ((plain, tmp_path / "a"), (profiled, tmp_path / "b")):
        assert cli.main(["run", str(suite), "--out", str(out)]) == 0
        (run_dir,) = (out / "p").iterdir()
        tables.append((run_dir, load_tables(run_dir)))
    (dir_a, a), (dir_b, b) = tables
    assert not (dir_a / "kernels.parquet").exists()
    kernels = pd.read_parquet(dir_b / "kernels.parquet")
    assert set(kernels["cell_id"]) == set(b["cells"]["cell_id"]) == set(a["cells"]["cell_id"])
    losses = [
        t["curves"].sort_values(["cell_id", "step"])["train_loss"].dropna().tolist() for t in (a, b)
    ]
    assert losses[0] and losses[0] == losses[1]


def test_profile_command_and_show_kernels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = tmp_path / "p.toml"
    suite.write_text(SUITE)
    out = tmp_path / "out"
    assert cli.main(["profile", str(suite), "--out", str(out), "--steps", "2"]) == 0
    (run_dir,) = (out / "p").iterdir()
    kernels = pd.read_parquet(run_dir / "kernels.parquet")
    assert list(kernels.columns) == list(KERNEL_COLUMNS)
    assert set(kernels["optimizer"]) == {"sgd", "skfac"}
    for cell_id, group in kernels.groupby("cell_id"):
        assert group["share"].sum() == pytest.approx(1.0, abs=1e-6)
        assert any((run_dir / "traces" / str(cell_id)).glob("*.pt.trace.json"))
    capsys.readouterr()
    assert cli.main(["show", str(run_dir), "--kernels", "--top", "2"]) == 0
    shown = capsys.readouterr().out
    assert "top 2 kernels" in shown and "skfac" in shown and "inverse" in shown
    assert cli.main(["show", str(tmp_path), "--kernels"]) == 2
    assert "kfacbench profile" in capsys.readouterr().err
