"""Dense diagnostics against brute force: F from explicit per-example Jacobians, F̃ from K-FAC's
factors formed densely, the one case where F̃ = F, and SKFAC's factors at full rank."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from shared_diagnostics import SUITE, output_hessian, tiny, tiny_workload
from torch import Tensor, nn

from kfacbench import cli
from kfacbench.core.problem import Problem
from kfacbench.diagnostics import dense as diagnose_dense
from kfacbench.diagnostics import quality as diagnose
from kfacbench.diagnostics.dense import (
    DenseSelection,
    choose_layers,
    dense_curvature,
    dense_rows,
    exact_inverse,
    kfac_inverse,
    rank_ladder,
    rank_rows,
    relative_errors,
    tridiag_dense_inverse,
)
from kfacbench.errors import KfacbenchError
from kfacbench.optim.capture import Capture, Layer, exact_output_grads, find_layers, grad_matrix
from kfacbench.optim.factors import cross_factors, kronecker_factors
from kfacbench.optim.tridiag import tridiag_apply, tridiag_inverse
from kfacbench.runs.schema import DIAGNOSTIC_COLUMNS
from kfacbench.workloads import WORKLOADS


def vec(mat: Tensor) -> Tensor:
    """The paper's column-stacking vec of an ``(out, in)`` matrix."""
    return mat.mT.flatten()


def brute_force_fisher(
    problem: Problem, layers: list[Layer], x: Tensor, y: Tensor, kind: str
) -> Tensor:
    """(1/m) Σ_n J_nᵀ B_n J_n w.r.t. the column-stacked vec(W̄_i) of ``layers`` (the others
    fixed), each example's Jacobian from torch.autograd.functional.jacobian; B_n the output-loss
    Hessian (exact) or r_n r_nᵀ (empirical)."""
    model = problem.model
    names = {id(p): n for n, p in model.named_parameters()}
    mats = [grad_matrix(c, [p.detach() for p in c.params()]) for c in layers]
    sizes = [m.numel() for m in mats]
    base = torch.cat([vec(m) for m in mats])
    fixed = {n: p.detach() for n, p in model.named_parameters()}
    total = torch.zeros(base.numel(), base.numel(), dtype=torch.float64)
    for i in range(x.shape[0]):

        def output(theta: Tensor, i: int = i) -> Tensor:
            state = dict(fixed)
            for c, piece, m in zip(layers, theta.split(sizes), mats, strict=True):
                w_bar = piece.view(m.shape[1], m.shape[0]).T
                state[names[id(c.module.weight)]] = w_bar[:, :-1]
                state[names[id(c.module.bias)]] = w_bar[:, -1]
            return torch.func.functional_call(model, state, (x[i : i + 1],))[0]

        jac = torch.autograd.functional.jacobian(output, base)  # (outputs, parameters)
        z = output(base).detach()
        total += jac.T @ output_hessian(problem.distribution, z, y[i : i + 1], kind) @ jac
    return total / x.shape[0]


@pytest.mark.parametrize("distribution", ["bernoulli", "gaussian", "categorical"])
@pytest.mark.parametrize("kind", ["exact", "empirical"])
@pytest.mark.parametrize("which", [slice(None), slice(1, 3)])
def test_dense_fisher_equals_explicit_per_example_jacobian_sums(
    distribution: str, kind: str, which: slice
) -> None:
    """All layers, and the two last of three with the first held fixed (F restricted)."""
    problem, x, y = tiny(distribution, (3, 4, 3, 2))
    layers = find_layers(problem.model)[0][which]
    curv = dense_curvature(problem, layers, x, y, kind)  # type: ignore[arg-type]
    expected = brute_force_fisher(problem, layers, x, y, kind)
    torch.testing.assert_close(curv.fisher, expected, rtol=1e-9, atol=1e-12)
    assert curv.offsets == [0, *itertools.accumulate(c.in_dim * c.out_dim for c in layers)]


def test_kronecker_blocks_are_kfac_factors_formed_densely() -> None:
    """F̃'s diagonal blocks are Ā ⊗ G of K-FAC's (exact) factors, its off-diagonal blocks
    Ā_ij ⊗ G_ij of the cross factors, for every pair of layers (not only neighbours)."""
    problem, x, y = tiny("categorical", (3, 4, 3, 2))
    layers = find_layers(problem.model)[0]
    curv = dense_curvature(problem, layers, x, y, "exact")
    kron = curv.kronecker()
    o = curv.offsets
    found = kronecker_factors(problem.model, problem, x, y, fisher="exact")
    capture = Capture(layers)
    with capture.recording():
        output = problem.forward(x)
    a_rows = [capture.inputs(c) for c in layers]
    g_rows = exact_output_grads(capture, layers, problem, output, retain_graph=False)
    for i, j in itertools.product(range(len(layers)), repeat=2):
        block = kron[o[i] : o[i + 1], o[j] : o[j + 1]]
        if i == j:
            a, g = found[layers[i].name]
        else:
            a, g = cross_factors(a_rows[i], a_rows[j], g_rows[i], g_rows[j], 6)
        torch.testing.assert_close(block, torch.kron(a, g), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("damping", [1e-2, 1.0])
def test_kfac_is_exact_for_one_linear_layer_with_gaussian_output(damping: float) -> None:
    """One Linear layer, Gaussian output, exact Fisher: F = Ā ⊗ I exactly, so F̃ = F and, with
    exact damping, F̃⁻¹ = (F + λI)⁻¹; the factored damping's cross terms make it differ."""
    problem, x, y = tiny("gaussian", (3, 2))
    layers = find_layers(problem.model)[0]
    curv = dense_curvature(problem, layers, x, y, "exact")
    errors = relative_errors(curv.kronecker(), curv.fisher, curv.offsets)
    assert errors[""] < 1e-12 and errors["_diag"] < 1e-12 and "_off" not in errors
    exact = exact_inverse(curv, damping)
    torch.testing.assert_close(kfac_inverse(curv, damping, "exact"), exact, rtol=1e-9, atol=1e-12)
    factored = relative_errors(kfac_inverse(curv, damping, "factored"), exact, curv.offsets)
    assert factored[""] > 1e-3


def test_two_layers_have_off_diagonal_error_and_the_block_diagonal_inverse_misses_it() -> None:
    problem, x, y = tiny("gaussian", (3, 4, 2))
    layers = find_layers(problem.model)[0]
    curv = dense_curvature(problem, layers, x, y, "exact")
    errors = relative_errors(curv.kronecker(), curv.fisher, curv.offsets)
    assert errors["_off"] > 1e-3
    exact = exact_inverse(curv, 0.1)
    blockdiag = relative_errors(kfac_inverse(curv, 0.1), exact, curv.offsets)
    assert blockdiag["_off"] == pytest.approx(1.0)  # no off-diagonal block at all
    tridiag = relative_errors(tridiag_dense_inverse(curv, 0.1), exact, curv.offsets)
    assert tridiag["_off"] < 1.0


def test_the_dense_tridiagonal_inverse_is_tridiag_apply() -> None:
    problem, x, y = tiny("bernoulli", (3, 4, 3, 2))
    layers = find_layers(problem.model)[0]
    curv = dense_curvature(problem, layers, x, y, "exact")
    dense = tridiag_dense_inverse(curv, 0.3)
    diag_a, diag_g = diagnose_dense._damped_factors(curv, 0.3)
    n = len(layers)
    inv = tridiag_inverse(
        diag_a, diag_g, [curv.a[i][i + 1] for i in range(n - 1)],
        [curv.g[i][i + 1] for i in range(n - 1)],
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    mats = [torch.randn(c.out_dim, c.in_dim, generator=gen, dtype=torch.float64) for c in layers]
    expected = torch.cat([vec(m) for m in tridiag_apply(inv, mats)])
    torch.testing.assert_close(dense @ torch.cat([vec(m) for m in mats]), expected)
    assert torch.allclose(dense, dense.T, atol=1e-10)  # F̂⁻¹ = Ξᵀ Λ Ξ is symmetric


def test_dense_rows_and_heatmaps() -> None:
    problem, x, y = tiny("bernoulli", (3, 4, 3, 2))
    layers = find_layers(problem.model)[0]
    rows, maps = dense_rows(
        problem, DenseSelection(tuple(layers)), x, y, fisher="exact", damping=0.1
    )
    scores = {(r["approximation"], r["metric"]): r["value"] for r in rows}
    assert {r["layer"] for r in rows} == {"dense:0..4"}
    assert scores[("reference", "dense_params")] == 16 + 15 + 8
    for name in ("kfac[exact]", "kfac-exact-damping[exact]", "kfac-tridiag[exact]"):
        for suffix in ("", "_diag", "_off"):
            assert 0 < scores[(name, f"inverse_error{suffix}")] <= 1.0 + 1e-9
    assert scores[("kfac[exact]", "fisher_error_off")] > 0
    assert maps["fisher"].shape == (39, 39) and maps["fisher"].dtype == np.float32
    assert list(maps["offsets"]) == [0, 16, 31, 39] and list(maps["layers"]) == ["0", "2", "4"]
    assert (maps["inverse_tridiag"] >= 0).all()


# --- which layers ----------------------------------------------------------------------------


def test_the_default_layers_are_the_middle_run_that_fits() -> None:
    curves = WORKLOADS["curves_ae"].build_model(torch.Generator())
    chosen = choose_layers(curves, 3000)
    assert isinstance(chosen, DenseSelection)
    assert [c.name for c in chosen.layers] == ["8", "10", "11", "13"]
    assert chosen.params == 1275 + 156 + 175 + 1300 and chosen.name == "dense:8..13"
    # 25-6 (156) and 6-25 (175) fit alone, equally near the middle: the larger one
    small = choose_layers(curves, 200)
    assert isinstance(small, DenseSelection) and [c.name for c in small.layers] == ["11"]
    mnist = WORKLOADS["mnist_ae"].build_model(torch.Generator())
    reason = choose_layers(mnist, 3000)
    assert reason == (
        "no Linear layer fits the budget of 3,000 parameters (the smallest, 6, has 7,530;"
        " raise --dense-budget)"
    )


@pytest.mark.parametrize(
    ("names", "fragment"),
    [
        (
            ("6", "8"),
            "--dense-layers 6,8: layers 6 (5,050), 8 (1,275): 6,325 parameters exceed the budget"
            " of 3,000 (--dense-budget)",
        ),
        (("8", "11"), "must be consecutive"),
        (("99",), "no covered layer '99' in this model (its Linear layers: 0, 2, 4"),
    ],
)
def test_bad_dense_layers_are_one_line_errors(names: tuple[str, ...], fragment: str) -> None:
    curves = WORKLOADS["curves_ae"].build_model(torch.Generator())
    with pytest.raises(KfacbenchError) as err:
        choose_layers(curves, 3000, names)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_conv_layer_cannot_be_chosen() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(KfacbenchError, match="0 is a conv layer"):
        choose_layers(model, 3000, ["0"])
    chosen = choose_layers(model, 3000)
    assert isinstance(chosen, DenseSelection) and [c.name for c in chosen.layers] == ["2"]


# --- SKFAC against rank ----------------------------------------------------------------------


def test_skfac_factor_error_vanishes_at_full_rank_and_grows_as_rank_falls() -> None:
    """On Linear layers SKFAC's ``sum`` rows from all m examples give K-FAC's factors exactly;
    from fewer examples the factors, and the damped inverse applied to the gradient, drift."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 5)).double()
    problem = Problem(model, "categorical")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (64,), generator=gen)
    rows = rank_rows(
        problem, x, y, damping=0.01, fisher="sampled", generator=torch.Generator().manual_seed(1)
    )
    table = pd.DataFrame(rows)
    assert set(table["approximation"]) == {"skfac-sum[sampled]"}
    assert sorted(set(table["rank"])) == rank_ladder(64) == [8, 16, 32, 64]
    for (layer, metric), group in table.groupby(["layer", "metric"]):
        error = group.set_index("rank")["value"]
        assert error[64] < 1e-10, (layer, metric)
        assert error[8] > error[32] > 1e-3, (layer, metric)


# --- `kfacbench diagnose` --------------------------------------------------------------------


def run_diagnose(tmp_path: Path, *extra: str) -> int:
    suite, out = tmp_path / "dg.toml", tmp_path / "out"
    suite.write_text(SUITE.replace("at = [0, 3, 6]", "at = [0, 3]"))
    return cli.main(["diagnose", str(suite), "--out", str(out), "--damping", "0.1", *extra])


def test_diagnose_writes_dense_and_rank_parts_and_resumes_without_recomputing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(WORKLOADS, "tiny_ae", tiny_workload())
    calls: dict[str, int] = {"base": 0, "dense": 0}
    real_base, real_dense = diagnose.checkpoint_rows, diagnose_dense.dense_rows

    def base(*args: Any, **kwargs: Any) -> Any:
        calls["base"] += 1
        return real_base(*args, **kwargs)

    def dense(*args: Any, **kwargs: Any) -> Any:
        calls["dense"] += 1
        return real_dense(*args, **kwargs)

    monkeypatch.setattr(diagnose, "checkpoint_rows", base)
    monkeypatch.setattr(diagnose_dense, "dense_rows", dense)
    assert run_diagnose(tmp_path) == 0
    assert calls == {"base": 4, "dense": 4}  # 2 cells × 2 checkpoints
    (run_dir,) = (tmp_path / "out" / "dg").iterdir()
    table = pd.read_parquet(run_dir / "diagnostics.parquet")
    assert list(table.columns) == list(DIAGNOSTIC_COLUMNS)
    dense_rows_ = table[table["layer"] == "dense:0..2"]
    assert set(dense_rows_["step"]) == {0, 3} and len(dense_rows_["cell_id"].unique()) == 2
    ranks = table[table["approximation"] == "skfac-sum[sampled]"]
    assert set(ranks["layer"]) == {"0", "2"} and set(ranks["rank"]) == {8, 16}
    assert table[table["layer"] == "all"]["rank"].isna().all()
    heatmaps = sorted((run_dir / "dense").glob("*.npz"))
    assert len(heatmaps) == 4
    with np.load(heatmaps[0]) as maps:
        assert maps["fisher"].shape == (76, 76)  # 8-4-8: 36 + 40 parameters

    # a lost dense part is computed again, and only it
    (victim,) = list((run_dir / "parts").glob("*.s3.dense.diagnostics.parquet"))[:1]
    victim.unlink()
    calls.update(base=0, dense=0)
    suite = tmp_path / "dg.toml"
    args = ["diagnose", str(suite), "--out", str(tmp_path / "out"), "--resume", "--damping", "0.1"]
    assert cli.main(args) == 0
    assert calls == {"base": 0, "dense": 1} and victim.exists()
    assert len(pd.read_parquet(run_dir / "diagnostics.parquet")) == len(table)


def test_an_old_table_without_rank_reads_with_rank_missing(tmp_path: Path) -> None:
    old = pd.DataFrame(
        [{"cell_id": "c", "label": "l", "optimizer": "sgd", "step": 0, "approximation": "gradient",
          "fisher": "exact", "layer": "all", "metric": "cosine", "value": 0.5}]
    )  # fmt: skip
    table = diagnose.diagnostics_frame([old])
    assert list(table.columns) == list(DIAGNOSTIC_COLUMNS)
    assert table["rank"].isna().all() and str(table["rank"].dtype) == "Int64"


def test_dense_budget_errors_are_one_line_and_create_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(WORKLOADS, "tiny_ae", tiny_workload())
    code = run_diagnose(tmp_path, "--dense-layers", "0,2", "--dense-budget", "50")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.endswith(
        "tiny_ae: --dense-layers 0,2: layers 0 (36), 2 (40): 76 parameters exceed the budget of"
        " 50 (--dense-budget)"
    )
    assert not (tmp_path / "out").exists()


def test_a_model_without_a_small_layer_is_not_applicable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(WORKLOADS, "tiny_ae", tiny_workload())
    assert run_diagnose(tmp_path, "--dense-budget", "30", "--no-rank", "--only", "sgd") == 0
    out = capsys.readouterr().out
    assert "dense diagnostics of tiny_ae: not applicable: no Linear layer fits the budget" in out
    (run_dir,) = (tmp_path / "out" / "dg").iterdir()
    table = pd.read_parquet(run_dir / "diagnostics.parquet")
    assert set(table["layer"]) == {"all"} and not (run_dir / "dense").exists()
    assert len(list((run_dir / "parts").glob("*.dense.diagnostics.parquet"))) == 2  # done, empty


def test_kronecker_error_equals_the_dense_one() -> None:
    gen = torch.Generator().manual_seed(2)
    a, a_r = (torch.randn(4, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    g, g_r = (torch.randn(3, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    dense = (torch.kron(a_r, g_r) - torch.kron(a, g)).norm() / torch.kron(a, g).norm()
    assert diagnose_dense._kronecker_error(a_r, g_r, a, g) == pytest.approx(float(dense))


def test_skfac_subsample_keeping_every_position_is_kfac_on_a_conv_layer() -> None:
    """A conv with 4 output positions: ``subsample`` keeps all 4 (s = 4) and so gives K-FAC's
    conv factors at full rank; ``sum`` does not (its factors are of summed patches)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4)).double()
    problem = Problem(model, "categorical")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (16,), generator=gen)
    table = pd.DataFrame(
        rank_rows(problem, x, y, damping=0.1, fisher="empirical", generator=torch.Generator())
    )
    assert set(table["approximation"]) == {"skfac-sum[empirical]", "skfac-subsample[empirical]"}
    full = table[(table["rank"] == 16) & (table["layer"] == "0")].set_index(
        ["approximation", "metric"]
    )["value"]
    for metric in ("factor_a_error", "factor_g_error", "kronecker_error", "inverse_error"):
        assert full[("skfac-subsample[empirical]", metric)] < 1e-10
        assert full[("skfac-sum[empirical]", metric)] > 1e-3
