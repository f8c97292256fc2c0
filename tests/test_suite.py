"""Suite files: sweep expansion, cell ids and labels, ``--only`` selection, and one-line errors."""

from __future__ import annotations

import hashlib
import json
import pickle
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from kfacbench.core.method import HParam, MethodSpec
from kfacbench.errors import SuiteError
from kfacbench.suite import Cell, Settings, Suite, load_suite, parse_suite


def _never_built(*args: Any) -> Any:
    raise AssertionError("suites never build methods")


SGD = MethodSpec(
    name="sgd",
    summary="fake SGD",
    hparams={
        "lr": HParam(0.01, "learning rate", bounds="[0, inf)"),
        "momentum": HParam(0.9, "momentum", bounds="[0, 1)"),
        "nesterov": HParam(False, "Nesterov momentum"),
        "form": HParam("pytorch", "momentum form", choices=("pytorch", "sutskever")),
        "warmup_steps": HParam(0, "warm-up steps", bounds="[0, inf)"),
    },
    uses_inv_interval=False,
    build=_never_built,
)
KFAC = MethodSpec(
    name="kfac",
    summary="fake K-FAC",
    hparams={
        "lr": HParam(0.1, "learning rate", bounds="[0, inf)"),
        "damping": HParam(1e-3, "damping", bounds="(0, inf)"),
    },
    uses_inv_interval=True,
    build=_never_built,
)
METHODS = {"sgd": SGD, "kfac": KFAC}
WORKLOADS = {"curves_ae", "mnist_ae", "cifar10_resnet20"}
SOURCE = "suites/t.toml"

BASE = """
[defaults]
max_steps = 10
[sweep]
workload = ["curves_ae"]
batch_size = [100]
[optimizers.sgd]
"""


def parse(text: str, name_default: str = "t") -> Suite:
    return parse_suite(
        tomllib.loads(text),
        source=SOURCE,
        workloads=WORKLOADS,
        methods=METHODS,
        name_default=name_default,
    )


def labels(suite: Suite) -> list[str]:
    return [c.label for c in suite.cells]


# --- expansion ---------------------------------------------------------------------------------

GRID = """
[defaults]
max_steps = 10
[sweep]
workload = ["curves_ae", "mnist_ae"]
batch_size = [100, 500]
seed = [0, 1]
inv_interval = [10, 20, 50]
[optimizers.sgd]
lr = [0.01, 0.1]
[optimizers.kfac]
"""


def test_expansion_count_and_inv_interval_collapse() -> None:
    cells = parse(GRID).cells
    # 2 workloads × 2 batch sizes × 2 seeds × (sgd: 2 lrs + kfac: 3 inversion intervals)
    assert len(cells) == 2 * 2 * 2 * (2 + 3) == 40
    sgd = [c for c in cells if c.optimizer == "sgd"]
    kfac = [c for c in cells if c.optimizer == "kfac"]
    assert len(sgd) == 16 and len(kfac) == 24
    assert {c.inv_interval for c in sgd} == {None}
    assert {c.inv_interval for c in kfac} == {10, 20, 50}
    assert len({c.id for c in cells}) == 40
    assert all(c.suite == "t" for c in cells)


def test_expansion_order_is_stable_and_readable() -> None:
    cells = parse(GRID).cells
    assert labels(parse(GRID)) == [c.label for c in cells]
    assert [c.workload for c in cells] == ["curves_ae"] * 20 + ["mnist_ae"] * 20
    # within a workload: optimizers in file order, then hparams, batch size, interval, seed
    assert [c.label for c in cells[:5]] == [
        "curves_ae sgd bs=100 lr=0.01 seed=0",
        "curves_ae sgd bs=100 lr=0.01 seed=1",
        "curves_ae sgd bs=500 lr=0.01 seed=0",
        "curves_ae sgd bs=500 lr=0.01 seed=1",
        "curves_ae sgd bs=100 lr=0.1 seed=0",
    ]
    assert cells[8].label == "curves_ae kfac bs=100 inv=10 seed=0"


def test_defaults_defaults_and_sweep_defaults() -> None:
    (cell,) = parse(BASE).cells
    assert dict(cell.hparams) == {
        "form": "pytorch",
        "lr": 0.01,
        "momentum": 0.9,
        "nesterov": False,
        "warmup_steps": 0,
    }
    assert list(cell.hparams) == sorted(cell.hparams)
    assert cell.seed == 0 and cell.inv_interval is None
    assert cell.settings == Settings(max_steps=10)


def test_kfac_defaults_filled_and_default_inv_interval() -> None:
    suite = parse(BASE.replace("[optimizers.sgd]", "[optimizers.kfac]\ndamping = 0.01"))
    (cell,) = suite.cells
    assert dict(cell.hparams) == {"damping": 0.01, "lr": 0.1}
    assert cell.inv_interval == 20


def test_values_are_converted_and_scalars_are_one_lists() -> None:
    suite = parse(
        """
        [defaults]
        max_seconds = 5
        [sweep]
        workload = "curves_ae"
        batch_size = 100
        seed = 3
        [optimizers.sgd]
        lr = 1
        momentum = [0, 0.5]
        """
    )
    assert [c.hparams["momentum"] for c in suite.cells] == [0.0, 0.5]
    assert all(type(c.hparams["lr"]) is float and c.hparams["lr"] == 1.0 for c in suite.cells)
    assert all(c.seed == 3 and c.batch_size == 100 for c in suite.cells)
    assert suite.cells[0].settings.max_seconds == 5.0
    assert type(suite.cells[0].settings.max_seconds) is float


def test_every_setting_is_read() -> None:
    values = {
        "device": "cuda:1",
        "data": "synthetic",
        "max_steps": 7,
        "max_seconds": 2.5,
        "eval_every": 3,
        "log_every": 4,
        "train_eval_size": 99,
        "eval_size": 50,
        "tf32": True,
        "amp": "bf16",
        "diverge_factor": 100.0,
        "stop_at_target": True,
        "compile": "reduce-overhead",
        "cudnn_benchmark": False,
        "count_ops": False,
        "cuda_graph": True,
    }
    assert set(values) == {f.name for f in fields(Settings)}
    defaults = "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())
    suite = parse(BASE.replace("max_steps = 10", defaults))
    assert suite.cells[0].settings == Settings(**values)  # type: ignore[arg-type]


def test_workload_overrides_apply_to_their_workload_only() -> None:
    suite = parse(
        """
        [defaults]
        max_steps = 10
        eval_every = 5
        [workloads.mnist_ae]
        max_seconds = 30
        eval_every = 2
        [sweep]
        workload = ["curves_ae", "mnist_ae"]
        batch_size = [100]
        [optimizers.sgd]
        """
    )
    by_workload = {c.workload: c.settings for c in suite.cells}
    assert by_workload["curves_ae"] == Settings(max_steps=10, eval_every=5)
    assert by_workload["mnist_ae"] == Settings(max_steps=10, max_seconds=30.0, eval_every=2)


def test_budget_may_come_from_a_workload_override() -> None:
    suite = parse(BASE.replace("max_steps = 10", "") + "[workloads.curves_ae]\nmax_steps = 3\n")
    assert suite.cells[0].settings.max_steps == 3


EXCLUDE_GRID = (
    GRID
    + """
[[exclude]]
workload = "mnist_ae"
optimizer = "sgd"
lr = 0.1
[[exclude]]
batch_size = 500
inv_interval = 50
"""
)


def test_exclude_removes_exactly_the_matching_cells() -> None:
    full = parse(GRID).cells
    kept = parse(EXCLUDE_GRID).cells

    def dropped(c: Cell) -> bool:
        first = c.workload == "mnist_ae" and c.optimizer == "sgd" and c.hparams["lr"] == 0.1
        return first or (c.batch_size == 500 and c.inv_interval == 50)

    assert sum(dropped(c) for c in full) == 4 + 4
    assert [c.id for c in kept] == [c.id for c in full if not dropped(c)]
    assert len(kept) == 40 - 8


def test_exclude_matches_int_to_float_but_not_bool_to_number() -> None:
    text = BASE.replace("[optimizers.sgd]", "[optimizers.sgd]\nlr = [1.0, 2.0]")
    assert len(parse(text + "[[exclude]]\nlr = 1\n").cells) == 1
    with pytest.raises(SuiteError, match=r"exclude\[0\]\.lr: no cell has lr=True"):
        parse(text + "[[exclude]]\nlr = true\n")


def test_exclude_list_values_match_any_of_them() -> None:
    listed = parse(GRID + "[[exclude]]\nbatch_size = 500\ninv_interval = [50, 20]\n").cells
    full = parse(GRID).cells
    want = [c.id for c in full if not (c.batch_size == 500 and c.inv_interval in (50, 20))]
    assert [c.id for c in listed] == want
    with pytest.raises(SuiteError, match=r"exclude\[0\]\.inv_interval: no cell has inv_interval=7"):
        parse(GRID + "[[exclude]]\ninv_interval = [50, 7]\n")
    with pytest.raises(SuiteError, match=r"exclude\[0\]\.seed: empty list"):
        parse(GRID + "[[exclude]]\nseed = []\n")


def test_exclude_on_a_hyperparameter_keeps_optimizers_without_it() -> None:
    suite = parse(GRID + '[[exclude]]\ndamping = 0.001\nworkload = "curves_ae"\n')
    assert {c.optimizer for c in suite.cells if c.workload == "curves_ae"} == {"sgd"}
    assert len(suite.cells) == 40 - 12


# --- ids and labels ----------------------------------------------------------------------------


def test_ids_are_stable_across_parses() -> None:
    assert [c.id for c in parse(GRID).cells] == [c.id for c in parse(GRID).cells]


def test_id_is_the_hash_of_the_config() -> None:
    cell = parse(BASE).cells[0]
    config = cell.config()
    assert "suite" not in config
    assert list(config) == [
        "workload",
        "optimizer",
        "batch_size",
        "inv_interval",
        "seed",
        "hparams",
        "settings",
    ]
    # A setting added later is hashed only when set, so ids of earlier runs stay valid.
    assert config["settings"].pop("diverge_factor") == 10.0
    assert config["settings"].pop("stop_at_target") is False
    assert config["settings"].pop("compile") == "off"
    assert config["settings"].pop("cudnn_benchmark") is True
    assert config["settings"].pop("cuda_graph") is False
    # A measurement-only setting is never hashed: counting ops or not trains the same cell.
    assert config["settings"].pop("count_ops") is True
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    assert cell.id == hashlib.sha256(text.encode()).hexdigest()[:12]
    uncounted = parse(BASE.replace("max_steps = 10", "max_steps = 10\ncount_ops = false"))
    assert uncounted.cells[0].settings.count_ops is False and uncounted.cells[0].id == cell.id
    untuned = parse(BASE.replace("max_steps = 10", "max_steps = 10\ncudnn_benchmark = false"))
    assert untuned.cells[0].id != cell.id  # a setting that changes the timings is the cell's


def test_same_config_in_two_suites_has_the_same_id() -> None:
    a = parse('name = "a"\ndescription = "one"\n' + BASE)
    b = parse('name = "b"\n' + BASE.replace("[optimizers.sgd]", "[optimizers.sgd]\nlr = 0.01"))
    assert (a.name, b.name) == ("a", "b")
    assert a.cells[0].suite == "a" and b.cells[0].suite == "b"
    assert a.cells[0].id == b.cells[0].id


def test_key_order_and_int_spelling_do_not_change_ids() -> None:
    one = parse(BASE.replace("[optimizers.sgd]", "[optimizers.sgd]\nlr = 1\nmomentum = 0.5"))
    two = parse(BASE.replace("[optimizers.sgd]", "[optimizers.sgd]\nmomentum = 0.5\nlr = 1.0"))
    assert one.cells[0].id == two.cells[0].id


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('workload = ["curves_ae"]', 'workload = ["mnist_ae"]'),
        ("batch_size = [100]", "batch_size = [101]"),
        ("batch_size = [100]", "batch_size = [100]\nseed = [1]"),
        ("[optimizers.sgd]", "[optimizers.sgd]\nlr = 0.02"),
        ("[optimizers.sgd]", "[optimizers.sgd]\nnesterov = true"),
        ("max_steps = 10", "max_steps = 11"),
        ("max_steps = 10", "max_steps = 10\nmax_seconds = 60"),
        ("max_steps = 10", 'max_steps = 10\ndevice = "cpu"'),
        ("max_steps = 10", "max_steps = 10\ntf32 = true"),
        ("max_steps = 10", "max_steps = 10\ndiverge_factor = 100"),
        ("max_steps = 10", "max_steps = 10\nstop_at_target = true"),
    ],
)
def test_any_config_change_changes_the_id(old: str, new: str) -> None:
    assert old in BASE
    assert parse(BASE).cells[0].id != parse(BASE.replace(old, new)).cells[0].id


def test_inv_interval_changes_the_id() -> None:
    kfac = BASE.replace("[optimizers.sgd]", "[optimizers.kfac]")
    other = kfac.replace("batch_size = [100]", "batch_size = [100]\ninv_interval = 5")
    assert parse(kfac).cells[0].id != parse(other).cells[0].id


def test_labels_show_only_varying_hyperparameters() -> None:
    suite = parse(
        BASE.replace("[optimizers.sgd]", "[optimizers.sgd]\nlr = [0.01, 0.1]\nmomentum = 0.5")
    )
    assert labels(suite) == [
        "curves_ae sgd bs=100 lr=0.01 seed=0",
        "curves_ae sgd bs=100 lr=0.1 seed=0",
    ]
    assert labels(parse(BASE)) == ["curves_ae sgd bs=100 seed=0"]


def test_labels_show_hyperparameters_that_still_vary_after_exclusion() -> None:
    text = BASE.replace("[optimizers.sgd]", "[optimizers.sgd]\nlr = [0.01, 0.1]")
    assert labels(parse(text + "[[exclude]]\nlr = 0.1\n")) == ["curves_ae sgd bs=100 seed=0"]


def test_labels_are_unique() -> None:
    suite = parse(GRID)
    assert len(set(labels(suite))) == len(suite.cells)


def test_cells_are_hashable_read_only_and_picklable() -> None:
    cell = parse(BASE).cells[0]
    assert pickle.loads(pickle.dumps(cell)) == cell
    assert len({cell, parse(BASE).cells[0]}) == 1
    with pytest.raises(TypeError):
        cell.hparams["lr"] = 1.0  # type: ignore[index]


# --- select ------------------------------------------------------------------------------------


def test_select() -> None:
    suite = parse(GRID)
    assert suite.select(None) == suite.cells
    assert len(suite.select("bs=500")) == 20
    assert len(suite.select("kfac")) == 24
    assert len(suite.select("*sgd*lr=0.1 *")) == 8
    assert len(suite.select("mnist_ae sgd bs=100 lr=0.1 seed=?")) == 2
    assert suite.select("no such cell") == ()
    cell = suite.cells[7]
    assert suite.select(cell.id) == (cell,)
    assert suite.select(cell.id[:8]) == (cell,)
    assert cell in suite.select(cell.id[:4] + "*")


# --- files -------------------------------------------------------------------------------------


def test_load_suite_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "my-suite.toml"
    path.write_text(BASE)
    suite = load_suite(path, workloads=WORKLOADS, methods=METHODS)
    assert suite.name == "my-suite" and suite.path == path and suite.description == ""
    assert suite.raw == tomllib.loads(BASE)
    assert suite.cells[0].suite == "my-suite"


def test_load_suite_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(SuiteError) as info:
        load_suite(path, workloads=WORKLOADS, methods=METHODS)
    assert str(info.value) == f"{path}: no such file"


def test_load_suite_toml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BASE.replace("max_steps = 10", "max_steps = = 10"))
    with pytest.raises(SuiteError) as info:
        load_suite(path, workloads=WORKLOADS, methods=METHODS)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 3" in message and "\n" not in message


def test_bundled_suites_validate_against_the_registries() -> None:
    from kfacbench.optim import METHODS as methods
    from kfacbench.workloads import WORKLOADS as workloads

    paths = sorted((Path(__file__).parents[1] / "suites").glob("*.toml"))
    assert paths
    for path in paths:
        assert load_suite(path, workloads=workloads, methods=methods).cells


# --- errors ------------------------------------------------------------------------------------

ERRORS = [
    # (text, key path, fragments of the message: the bad value and the hint)
    ("foo = 1\n" + BASE, "foo", ["unknown key 'foo'", "known: name, description"]),
    (
        BASE.replace("max_steps", "max_step"),
        "defaults.max_step",
        ["unknown key 'max_step'", "did you mean 'max_steps'", "known: device,"],
    ),
    (BASE.replace("batch_size", "seeds = [0]\nbatch_size"), "sweep.seeds", ["'seeds'"]),
    (BASE + "[[exclude]]\nlrr = 0.1\n", "exclude[0].lrr", ["'lrr'", "known: workload,", "lr"]),
    (
        BASE + "[workloads.curves_ae]\nmax_step = 5\n",
        "workloads.curves_ae.max_step",
        ["unknown key 'max_step'"],
    ),
    (
        BASE + "[optimizers.adam]\n",
        "optimizers.adam",
        ["unknown optimizer 'adam'", "known: sgd, kfac"],
    ),
    (
        BASE + "lrr = 0.1\n",
        "optimizers.sgd.lrr",
        ["unknown sgd hyperparameter 'lrr'", "known: lr, momentum, nesterov, form, warmup"],
    ),
    (
        BASE.replace('["curves_ae"]', '["curves_ae", "curves"]'),
        "sweep.workload[1]",
        ["unknown workload 'curves'", "known: cifar10_resnet20, curves_ae, mnist_ae"],
    ),
    (BASE + "[workloads.mnist_ae]\n", "workloads.mnist_ae", ["'mnist_ae' is not in sweep"]),
    (
        BASE.replace("[100]", "[100, 'abc']"),
        "sweep.batch_size[1]",
        ["expected an integer in [1, 2**63-1], got 'abc'"],
    ),
    (BASE.replace("[100]", "[0]"), "sweep.batch_size[0]", ["got 0"]),
    (BASE.replace("[100]", "[100]\nseed = -1"), "sweep.seed", ["in [0, 2**63-1], got -1"]),
    (BASE.replace("[100]", "[100]\ninv_interval = [0]"), "sweep.inv_interval[0]", ["got 0"]),
    (BASE.replace("[100]", "[100]\nseed = [1, 1]"), "sweep.seed[1]", ["repeats the value 1"]),
    (BASE.replace("[100]", "[]"), "sweep.batch_size", ["non-empty list, got []"]),
    (BASE.replace('["curves_ae"]', "[]"), "sweep.workload", ["got []"]),
    (BASE.replace('["curves_ae"]', "[1]"), "sweep.workload[0]", ["expected a string, got 1"]),
    (BASE.replace("batch_size = [100]", ""), "sweep.batch_size", ["missing"]),
    (BASE.replace('workload = ["curves_ae"]', ""), "sweep.workload", ["missing"]),
    (
        "sweep = 3\n[defaults]\nmax_steps = 1\n[optimizers.sgd]",
        "sweep",
        ["expected a table, got 3"],
    ),
    ("[optimizers.sgd]\n[defaults]\nmax_steps = 1", "sweep", ["missing"]),
    (BASE.replace("max_steps = 10", "max_steps = true"), "defaults.max_steps", ["got True"]),
    (
        BASE.replace("max_steps = 10", "max_steps = 0"),
        "defaults.max_steps",
        ["in [1, 2**63-1], got 0"],
    ),
    (
        BASE.replace("max_steps = 10", "max_steps = 10\nmax_seconds = 0"),
        "defaults.max_seconds",
        ["in (0, 2592000], got 0"],
    ),
    (
        BASE.replace("max_steps = 10", "max_steps = 10\nmax_seconds = '60'"),
        "defaults.max_seconds",
        ["got '60'"],
    ),
    (
        BASE.replace("max_steps = 10", "max_steps = 10\nmax_seconds = nan"),
        "defaults.max_seconds",
        ["got nan"],
    ),
    (
        BASE.replace("max_steps = 10", "max_steps = 10\ndevice = 'gpu'"),
        "defaults.device",
        ["'cuda:N', got 'gpu'"],
    ),
    (
        BASE.replace("max_steps = 10", "max_steps = 10\ndevice = 'cuda:x'"),
        "defaults.device",
        ["got 'cuda:x'"],
    ),
    (
        BASE.replace("max_steps = 10", "max_steps = 10\ndata = 'fake'"),
        "defaults.data",
        ["'synthetic', got 'fake'"],
    ),
    (
        BASE.replace("max_steps = 10", "max_steps = 10\namp = 'fp8'"),
        "defaults.amp",
        ["'bf16', got 'fp8'"],
    ),
    (
        BASE.replace("max_steps = 10", "max_steps = 10\ntf32 = 1"),
        "defaults.tf32",
        ["true or false, got 1"],
    ),
    (
        BASE.replace("max_steps = 10", "max_steps = 10\neval_every = 0"),
        "defaults.eval_every",
        ["got 0"],
    ),
    (
        BASE.replace("max_steps = 10", "max_steps = 10\nlog_every = 2.5"),
        "defaults.log_every",
        ["got 2.5"],
    ),
    (
        BASE.replace("max_steps = 10", "max_steps = 10\ntrain_eval_size = -5"),
        "defaults.train_eval_size",
        ["got -5"],
    ),
    (BASE.replace("max_steps = 10", "max_steps = 1\n[defaults.x]"), "defaults.x", ["'x'"]),
    (
        BASE.replace("[defaults]\nmax_steps = 10", "defaults = 1"),
        "defaults",
        ["expected a table, got 1"],
    ),
    (
        BASE + "[workloads.curves_ae]\nmax_steps = 'x'\n",
        "workloads.curves_ae.max_steps",
        ["got 'x'"],
    ),
    (BASE + "lr = -0.1\n", "optimizers.sgd.lr", ["expected a finite number in [0, inf), got -0.1"]),
    (BASE + "lr = true\n", "optimizers.sgd.lr", ["got True"]),
    (BASE + "lr = '0.1'\n", "optimizers.sgd.lr", ["got '0.1'"]),
    (BASE + "lr = [0.1, [0.2]]\n", "optimizers.sgd.lr[1]", ["got [0.2]"]),
    (BASE + "lr = [1, 1.0]\n", "optimizers.sgd.lr[1]", ["repeats the value 1.0"]),
    (BASE + "lr = []\n", "optimizers.sgd.lr", ["got []"]),
    (BASE + "momentum = nan\n", "optimizers.sgd.momentum", ["got nan"]),
    (
        BASE + "warmup_steps = 1.5\n",
        "optimizers.sgd.warmup_steps",
        ["integer in [0, 2**63-1], got 1.5"],
    ),
    (BASE + "warmup_steps = -1\n", "optimizers.sgd.warmup_steps", ["got -1"]),
    (BASE + "warmup_steps = false\n", "optimizers.sgd.warmup_steps", ["got False"]),
    (BASE + "nesterov = 1\n", "optimizers.sgd.nesterov", ["true or false, got 1"]),
    (
        BASE + "form = ['pytorch', 'nesterov']\n",
        "optimizers.sgd.form[1]",
        ["expected one of 'pytorch', 'sutskever', got 'nesterov'"],
    ),
    (BASE.replace("[optimizers.sgd]", "[optimizers]\nsgd = 1"), "optimizers.sgd", ["got 1"]),
    (BASE.replace("[optimizers.sgd]", ""), "optimizers", ["missing", "known: sgd, kfac"]),
    ("optimizers = {}\n" + BASE.replace("[optimizers.sgd]", ""), "optimizers", ["empty"]),
    (BASE.replace("max_steps = 10", ""), "defaults", ["max_steps", "max_seconds", "curves_ae"]),
    ('name = "my suite"\n' + BASE, "name", ["got 'my suite'"]),
    ("description = 3\n" + BASE, "description", ["expected a string, got 3"]),
    (BASE + "[[exclude]]\n", "exclude[0]", ["empty table"]),
    ("exclude = {seed = 0}\n" + BASE, "exclude", ["[[exclude]]", "{'seed': 0}"]),
    (
        BASE + "[[exclude]]\nlr = 0.5\n",
        "exclude[0].lr",
        ["no cell has lr=0.5", "values in this suite: 0.01"],
    ),
    (BASE + "[[exclude]]\noptimizer = 'kfac'\n", "exclude[0].optimizer", ["'kfac'", "'sgd'"]),
    (BASE + "[[exclude]]\noptimizer = 'sgd'\n", "exclude", ["removes all 1 cells"]),
    (
        GRID + "[[exclude]]\noptimizer = 'sgd'\ninv_interval = 10\n",
        "exclude[0]",
        ["matches no cell"],
    ),
    (BASE + '"lr\\nx" = 1\n', "optimizers.sgd.lr x", ["'lr\\nx'"]),
]


@pytest.mark.parametrize(("text", "path", "fragments"), ERRORS)
def test_errors_name_file_key_and_value(text: str, path: str, fragments: list[str]) -> None:
    with pytest.raises(SuiteError) as info:
        parse(text)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: {path}: "), message
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message


def test_example_error_message_in_full() -> None:
    with pytest.raises(SuiteError) as info:
        parse(BASE.replace("[100]", "[100, 'abc']"))
    expected = "suites/t.toml: sweep.batch_size[1]: expected an integer in [1, 2**63-1], got 'abc'"
    assert str(info.value) == expected


# --- ranges of the registered methods' hyperparameters ----------------------------------------

REAL = """
[defaults]
{defaults}
[sweep]
workload = ["curves_ae"]
batch_size = [{batch}]
seed = [{seed}]
[optimizers.{optimizer}]
{hparams}
"""


def parse_real(
    optimizer: str,
    hparams: str = "",
    *,
    defaults: str = "max_steps = 10",
    batch: str = "100",
    seed: str = "0",
) -> Suite:
    from kfacbench.optim import METHODS as REGISTERED
    from kfacbench.workloads import WORKLOADS as REGISTERED_WORKLOADS

    text = REAL.format(
        defaults=defaults, batch=batch, seed=seed, optimizer=optimizer, hparams=hparams
    )
    return parse_suite(
        tomllib.loads(text),
        source=SOURCE,
        workloads=REGISTERED_WORKLOADS,
        methods=REGISTERED,
        name_default="t",
    )


@pytest.mark.parametrize(
    ("optimizer", "line", "path"),
    [
        ("sgd", "lr = inf", "optimizers.sgd.lr"),
        ("sgd", "momentum = 1.5", "optimizers.sgd.momentum"),
        ("sgd", "momentum = 1.0", "optimizers.sgd.momentum"),
        ("sgd", "weight_decay = inf", "optimizers.sgd.weight_decay"),
        ("sgd", "lr_decay = 0", "optimizers.sgd.lr_decay"),
        ("kfac", "damping = inf", "optimizers.kfac.damping"),
        ("kfac", "damping = 0", "optimizers.kfac.damping"),
        ("kfac-fast", "damping = 0.0", "optimizers.kfac-fast.damping"),
        ("kfac", "cov_fraction = 1.5", "optimizers.kfac.cov_fraction"),
        ("kfac", "cov_fraction = 0", "optimizers.kfac.cov_fraction"),
        ("kfac", "ema_max = 1.0", "optimizers.kfac.ema_max"),
        ("kfac", "polyak = 1", "optimizers.kfac.polyak"),
        ("kfac", "momentum = -inf", "optimizers.kfac.momentum"),
        ("kfac", "lm_interval = 9223372036854775808", "optimizers.kfac.lm_interval"),
        ("skfac", "factor_decay = 1.0", "optimizers.skfac.factor_decay"),
        ("skfac", "damping = 0", "optimizers.skfac.damping"),
        ("skfac", "lr = nan", "optimizers.skfac.lr"),
        ("adamw", "beta2 = 1.0", "optimizers.adamw.beta2"),
    ],
)
def test_values_that_cannot_run_are_rejected(optimizer: str, line: str, path: str) -> None:
    with pytest.raises(SuiteError, match=rf"^{SOURCE}: {path}: expected .* got "):
        parse_real(optimizer, line)


@pytest.mark.parametrize(
    ("kwargs", "path"),
    [
        ({"defaults": "max_seconds = inf"}, "defaults.max_seconds"),
        ({"defaults": "max_seconds = 1e308"}, "defaults.max_seconds"),
        ({"defaults": "max_steps = 10\ndiverge_factor = 1"}, "defaults.diverge_factor"),
        ({"seed": "9223372036854775808"}, r"sweep.seed\[0\]"),
        ({"batch": "18446744073709551616"}, r"sweep.batch_size\[0\]"),
        ({"defaults": "max_steps = 9223372036854775808"}, "defaults.max_steps"),
        ({"defaults": "max_steps = 10\nmax_seconds = 1" + "0" * 400}, "defaults.max_seconds"),
    ],
)
def test_budgets_and_integers_must_be_able_to_run(kwargs: dict[str, str], path: str) -> None:
    with pytest.raises(SuiteError, match=rf"^{SOURCE}: {path}: (expected|an integer of \d+ bits)"):
        parse_real("sgd", **kwargs)


def test_an_integer_too_long_to_print_is_one_line(tmp_path: Path) -> None:
    """Python cannot print an integer of more than 4,300 digits; TOML's hex has no limit."""
    path = tmp_path / "t.toml"
    path.write_text(
        REAL.format(
            defaults="max_steps = 1", batch="0x" + "f" * 3600, seed="0", optimizer="sgd", hparams=""
        )
    )
    with pytest.raises(SuiteError, match=r"sweep.batch_size\[0\]: an integer of 14400 bits"):
        load_suite(path, workloads={"curves_ae"}, methods=METHODS)
    path.write_text(path.read_text().replace("0x" + "f" * 3600, "1" * 4301))
    with pytest.raises(SuiteError, match="invalid TOML: Exceeds the limit"):
        load_suite(path, workloads={"curves_ae"}, methods=METHODS)


def test_largest_int64_values_are_accepted() -> None:
    suite = parse_real("sgd", seed="9223372036854775807", defaults="max_seconds = 2592000")
    assert suite.cells[0].seed == 2**63 - 1


def test_a_diagnose_table_sets_the_checkpoints() -> None:
    assert parse(BASE).diagnose_at is None
    assert parse(BASE + "[diagnose]\nat = [200, 0, 50]\n").diagnose_at == (0, 50, 200)
    with pytest.raises(SuiteError, match=r"diagnose.at\[1\]: expected an integer in \[0, "):
        parse(BASE + "[diagnose]\nat = [0, -1]\n")
    with pytest.raises(SuiteError, match="unknown key 'every'"):
        parse(BASE + "[diagnose]\nevery = 5\n")


# --- the compile setting -----------------------------------------------------------------------


def test_compile_is_a_setting_and_a_sweep_axis() -> None:
    (eager,) = parse(BASE).cells
    assert eager.settings.compile == "off" and "compile" not in eager.label
    (set_once,) = parse(BASE.replace("max_steps = 10", 'max_steps = 10\ncompile = "default"')).cells
    assert set_once.settings.compile == "default" and set_once.id != eager.id
    swept = parse(
        BASE.replace("batch_size = [100]", 'batch_size = [100]\ncompile = ["off", "max-autotune"]')
    )
    assert [c.settings.compile for c in swept.cells] == ["off", "max-autotune"]
    assert labels(swept) == [
        "curves_ae sgd bs=100 seed=0",
        "curves_ae sgd bs=100 compile=max-autotune seed=0",
    ]
    assert swept.cells[0].id == eager.id
    excluded = parse(
        BASE.replace("batch_size = [100]", 'batch_size = [100]\ncompile = ["off", "default"]')
        + '[[exclude]]\ncompile = "off"\n'
    )
    assert [c.settings.compile for c in excluded.cells] == ["default"]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (BASE.replace("max_steps = 10", 'max_steps = 10\ncompile = "fast"'), "defaults.compile"),
        (
            BASE.replace("batch_size = [100]", 'batch_size = [100]\ncompile = ["on"]'),
            "sweep.compile",
        ),
    ],
)
def test_an_unknown_compile_mode_names_the_key(text: str, key: str) -> None:
    with pytest.raises(SuiteError, match=rf"{key}.*'reduce-overhead'"):
        parse(text)


def test_cuda_graph_is_a_setting_and_a_sweep_axis_crossed_with_compile() -> None:
    (eager,) = parse(BASE).cells
    assert eager.settings.cuda_graph is False and "cuda_graph" not in eager.label
    (on,) = parse(BASE.replace("max_steps = 10", "max_steps = 10\ncuda_graph = true")).cells
    assert on.settings.cuda_graph is True and on.id != eager.id
    swept = parse(
        BASE.replace(
            "batch_size = [100]",
            'batch_size = [100]\ncuda_graph = [false, true]\ncompile = ["off", "default"]',
        )
        + '[[exclude]]\ncuda_graph = true\ncompile = "default"\n'
    )
    assert labels(swept) == [
        "curves_ae sgd bs=100 seed=0",
        "curves_ae sgd bs=100 cuda_graph seed=0",
        "curves_ae sgd bs=100 compile=default seed=0",
    ]
    assert swept.cells[0].id == eager.id and swept.cells[1].id == on.id
    with pytest.raises(SuiteError, match=r"sweep\.cuda_graph\[0\]: expected true or false"):
        parse(BASE.replace("batch_size = [100]", "batch_size = [100]\ncuda_graph = [1]"))


# --- evaluation sizes --------------------------------------------------------------------------


def test_evaluation_sizes_default_per_data_mode_and_take_all_or_zero() -> None:
    """Real data: 1,024 examples each; synthetic data, unless the suite sets them: none; a size
    set in [defaults] or [workloads.*] is kept on synthetic data; "all" is the whole split."""
    real = parse(BASE).cells[0].settings
    assert (real.train_eval_size, real.eval_size) == (1024, 1024)
    synthetic = parse(BASE.replace("max_steps = 10", 'max_steps = 10\ndata = "synthetic"'))
    assert (synthetic.cells[0].settings.train_eval_size, synthetic.cells[0].settings.eval_size) == (
        0,
        0,
    )
    text = BASE.replace(
        "max_steps = 10", 'max_steps = 10\ndata = "synthetic"\neval_size = "all"'
    ).replace('workload = ["curves_ae"]', 'workload = ["curves_ae", "mnist_ae"]')
    text += "[workloads.mnist_ae]\ntrain_eval_size = 64\n"
    cells = {c.workload: c.settings for c in parse(text).cells}
    assert (cells["curves_ae"].train_eval_size, cells["curves_ae"].eval_size) == (0, None)
    assert (cells["mnist_ae"].train_eval_size, cells["mnist_ae"].eval_size) == (64, None)


@pytest.mark.parametrize("value", ['"some"', "-1", "1.5", "true"])
def test_a_bad_evaluation_size_names_its_key(value: str) -> None:
    with pytest.raises(SuiteError, match=r"defaults\.eval_size.*'all'"):
        parse(BASE.replace("max_steps = 10", f"max_steps = 10\neval_size = {value}"))
