"""The measured-against-model table: pairing with SGD, the model's ratio, achieved rates."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from kfacbench.optim.flops import kfac_flops, layer_shapes, refreshes, sgd_flops
from kfacbench.report.arithmetic import arithmetic_table
from kfacbench.workloads import WORKLOADS


def cell(cid: str, optimizer: str, seed: int, train_time_s: float, **kw: object) -> dict:
    info = kw.pop("method_info", {})
    return {
        "cell_id": cid,
        "workload": "curves_ae",
        "batch_size": 100,
        "compile": "off",
        "seed": seed,
        "optimizer": optimizer,
        "inv_interval": 10,
        "steps": 40,
        "status": "ok",
        "train_time_s": train_time_s,
        "device_kind": "cpu",
        "hparams": json.dumps(kw.pop("hparams", {})),
        "method_info": json.dumps(info),
    } | kw


def phase(cid: str, name: str, calls: int, total_s: float) -> dict:
    return {"cell_id": cid, "phase": name, "calls": calls, "total_s": total_s}


def test_kfac_fast_is_divided_by_the_sgd_of_its_seed_and_by_the_model() -> None:
    sizes_methods = {"inverse_method": "cholesky"}
    cells = pd.DataFrame(
        [
            cell("s0", "sgd", 0, 2.0),
            cell("s1", "sgd", 1, 4.0),
            cell("k0", "kfac-fast", 0, 6.0, hparams=sizes_methods),
            cell("k1", "kfac-fast", 1, 6.0, hparams=sizes_methods),
            cell("x", "adamw", 0, 1.0),  # not modelled: left out
            cell("e", "kfac-fast", 2, 1.0, status="error"),  # not ok: left out
        ]
    )
    phases = pd.DataFrame(
        [
            phase("s0", "forward", 40, 0.5),
            phase("s0", "backward", 40, 1.0),
            phase("k0", "forward", 40, 0.5),
            phase("k0", "backward", 40, 1.0),
            phase("k0", "curvature", 40, 2.0),
            phase("k0", "inverse", 7, 0.7),
        ]
    )
    table = arithmetic_table(cells, phases).set_index("cell_id")
    assert list(table.index) == ["s0", "s1", "k0", "k1"]
    assert table.loc["k0", "measured_ratio"] == pytest.approx(3.0)  # 6 s / 2 s, seed 0
    assert table.loc["k1", "measured_ratio"] == pytest.approx(1.5)  # 6 s / 4 s, seed 1

    workload = WORKLOADS["curves_ae"]
    model = workload.build_model(torch.Generator().manual_seed(0))
    shapes = layer_shapes(model, workload.input_shape)
    params = sum(p.numel() for p in model.parameters())
    sgd = sgd_flops(shapes, 100, params)
    sizes = [d for s in shapes for d in (s.d_in, s.d_out)]
    methods = ["cholesky"] * len(set(sizes))  # a CPU: one bucket per distinct size
    kfac = kfac_flops(shapes, 100, params, inverse_methods=methods, device="cpu")
    n = refreshes(40, 10)
    assert n == 6
    want = kfac.amortized(n, 40) / sgd.amortized(0, 40)
    assert table.loc["k0", "model_ratio"] == pytest.approx(want)
    assert table.loc["k0", "over_model"] == pytest.approx(3.0 / want)
    assert table.loc["k0", "gflops_curvature"] == pytest.approx(kfac.curvature * 40 / 2.0 / 1e9)
    assert table.loc["k0", "gflops_inverse"] == pytest.approx(kfac.inverse * 7 / 0.7 / 1e9)
    assert table.loc["s0", "gflops_fwd_bwd"] == pytest.approx(
        (sgd.forward + sgd.backward) * 40 / 1.5 / 1e9
    )
    assert pd.isna(table.loc["k1", "gflops_curvature"])  # no phases recorded


def test_recorded_bucket_methods_take_precedence() -> None:
    """A cell that recorded its buckets (``auto``) is modelled with them, not its setting."""
    info = {"inverse_buckets": [{"size": 1, "factors": 1, "method": "eigh"}]}
    cells = pd.DataFrame(
        [
            cell("s0", "sgd", 0, 2.0),
            cell("k0", "kfac-fast", 0, 6.0, hparams={"inverse_method": "auto"}, method_info=info),
        ]
    )
    with pytest.raises(ValueError, match="buckets but 1 inverse methods"):
        arithmetic_table(cells, pd.DataFrame(columns=["cell_id", "phase", "calls", "total_s"]))


ARITH_SUITE = """
name = "arith"
[defaults]
device = "cpu"
data = "synthetic"
max_steps = 6
eval_every = 6
log_every = 3
[sweep]
workload = ["curves_ae"]
batch_size = [32]
inv_interval = [3]
seed = [0]
[optimizers.sgd]
lr = 0.01
[optimizers.kfac-fast]
lr = 0.01
inverse_method = "cholesky"
[optimizers.adamw]
lr = 0.001
"""


def test_the_cli_prints_the_table_of_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kfacbench import cli

    suite = tmp_path / "arith.toml"
    suite.write_text(ARITH_SUITE)
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out")]) == 0
    (run_dir,) = (tmp_path / "out" / "arith").iterdir()
    capsys.readouterr()
    assert cli.main(["arithmetic", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "kfac-fast" in text and "sgd" in text and "adamw" not in text
    assert "the device's float32 GEMM rate, measured before the cells:" in text
    only_adamw = tmp_path / "only.toml"
    only_adamw.write_text(
        ARITH_SUITE.replace('name = "arith"', 'name = "only"').split("[optimizers.sgd]")[0]
        + "[optimizers.adamw]\nlr = 0.001\n"
    )
    assert cli.main(["run", str(only_adamw), "--out", str(tmp_path / "out")]) == 0
    (other,) = (tmp_path / "out" / "only").iterdir()
    assert cli.main(["arithmetic", str(other)]) == 2  # bad input: one line, exit 2
    assert "no ok cell of sgd or kfac-fast" in capsys.readouterr().err
