"""Plugins: a user's own optimizer and workload run on the core without touching the package: a
torch.optim class by import path, a plugin file, an installed package's entry points; where each
comes from, and one-line errors that name the plugin."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from kfacbench import cli, plugins
from kfacbench.errors import KfacbenchError, SuiteError
from kfacbench.optim import METHODS
from kfacbench.runs.rundir import load_tables
from kfacbench.suite import load_suite
from kfacbench.workloads import WORKLOADS

EXAMPLE = Path(__file__).parents[1] / "examples" / "plugin"

MY_METHOD = (EXAMPLE / "signsgd.py").read_text()
"""The single-file plugin of docs/plugins.md."""

SUITE = """
name = "mine"
{head}
[defaults]
device = "cpu"
data = "synthetic"
max_steps = 6
eval_every = 3
log_every = 3
[sweep]
workload = ["{workload}"]
batch_size = [32]
inv_interval = [3]
[optimizers.sgd]
lr = 0.1
[optimizers.kfac-fast]
lr = 0.1
[optimizers.skfac]
lr = 0.1
{optimizers}
"""


@pytest.fixture(autouse=True)
def registries() -> Iterator[None]:
    """Each test's plugins leave the registries as they were."""
    methods, workloads, loaded = dict(METHODS), dict(WORKLOADS), set(plugins._LOADED)
    yield
    METHODS.clear()
    METHODS.update(methods)
    WORKLOADS.clear()
    WORKLOADS.update(workloads)
    plugins._LOADED.clear()
    plugins._LOADED.update(loaded)


def suite(
    tmp_path: Path, head: str = "", optimizers: str = "", workload: str = "curves_ae"
) -> Path:
    path = tmp_path / "mine.toml"
    text = SUITE.format(head=head, optimizers=textwrap.dedent(optimizers), workload=workload)
    path.write_text(text)
    return path


def run(path: Path, tmp_path: Path) -> dict[str, dict]:
    assert cli.main(["run", str(path), "--out", str(tmp_path / "out")]) == 0
    (run_dir,) = (tmp_path / "out" / "mine").iterdir()
    cells = load_tables(run_dir)["cells"]
    return {rec["optimizer"]: rec for rec in cells.to_dict("records")}


def test_a_plugin_file_runs_against_sgd_kfac_and_skfac(tmp_path: Path) -> None:
    (tmp_path / "my_method.py").write_text(MY_METHOD)
    path = suite(tmp_path, 'plugins = ["my_method.py"]', "[optimizers.signsgd]\nlr = 0.003\n")
    cells = run(path, tmp_path)
    assert set(cells) == {"sgd", "kfac-fast", "skfac", "signsgd"}
    assert {c["status"] for c in cells.values()} == {"ok"}
    assert METHODS["signsgd"].origin == f"plugin {tmp_path / 'my_method.py'}"
    assert METHODS["signsgd"].hparams["lr"].default == 0.01  # from the signature


def test_a_torch_optimizer_by_import_path_takes_its_keyword_arguments(tmp_path: Path) -> None:
    path = suite(
        tmp_path,
        optimizers="""
        [optimizers.adagrad]
        class = "torch.optim:Adagrad"
        lr = [0.01, 0.1]
        weight_decay = 0
        """,
    )
    cells = run(path, tmp_path)
    assert cells["adagrad"]["status"] == "ok"
    spec = METHODS["adagrad"]
    assert spec.origin.endswith("torch.optim:Adagrad")
    assert spec.hparams["weight_decay"].default == 0.0  # annotated float: a float hyperparameter
    assert '"class": "torch.optim:Adagrad"' in cells["adagrad"]["method_info"]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            'class = "torch.optim:Adagrad"\nbetas = 1.0',
            r"optimizers\.opt\.betas: unknown opt hyperparameter 'betas'; known: lr, ",
        ),
        ('class = "torch.optim:Nope"', r"optimizers\.opt\.class: 'torch.optim' has no attribute"),
        ('class = "no_such_module:X"', r"optimizers\.opt\.class: cannot import 'no_such_module'"),
        ('class = "torch.nn:Linear"', r"optimizers\.opt\.class: .* not a torch.optim.Optimizer"),
        ('class = "Adagrad"', r"optimizers\.opt\.class: expected 'module:Class'"),
        ('class = "missing.py:X"', r"optimizers\.opt\.class: no such file"),
    ],
)
def test_a_bad_import_path_is_a_one_line_error_naming_the_key(
    tmp_path: Path, table: str, message: str
) -> None:
    path = suite(tmp_path, optimizers=f"[optimizers.opt]\n{table}\n")
    with pytest.raises(SuiteError, match=message) as info:
        load_suite(path, workloads=WORKLOADS, methods=METHODS)
    assert "\n" not in str(info.value)


def test_an_optimizer_in_a_file_beside_the_suite(tmp_path: Path) -> None:
    (tmp_path / "my_opt.py").write_text("import torch\n\nclass Plain(torch.optim.SGD):\n    pass\n")
    path = suite(tmp_path, optimizers='[optimizers.plain]\nclass = "my_opt.py:Plain"\nlr = 0.1\n')
    (cell,) = [c for c in load_suite(path, workloads=WORKLOADS, methods=METHODS).cells
               if c.optimizer == "plain"]  # fmt: skip
    assert cell.hparams["lr"] == 0.1 and cell.hparams["momentum"] == 0.0


def test_a_failing_plugin_and_a_taken_name_are_errors_naming_the_plugin(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('oops')\n")
    with pytest.raises(SuiteError, match=r"plugins\[0\]: plugin .*broken.py: RuntimeError: oops"):
        load_suite(suite(tmp_path, 'plugins = ["broken.py"]'), workloads=WORKLOADS, methods=METHODS)
    clash = tmp_path / "clash.py"
    clash.write_text(MY_METHOD.replace('method_spec("signsgd"', 'method_spec("sgd"'))
    with pytest.raises(
        KfacbenchError, match=r"optimizer 'sgd' from plugin .* registered by kfacbench"
    ):
        plugins.load_file(clash)
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(KfacbenchError, match="defines neither METHODS nor WORKLOADS"):
        plugins.load_file(empty)


def test_entry_points_of_an_installed_package_register_with_their_origin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package on the path with a dist-info folder, as pip installs one: the example plugin's
    modules under other names (the example itself may be installed too), declared in the two
    entry-point groups."""
    package = tmp_path / "spirals_pkg"
    package.mkdir()
    for name in ("signum.py", "spirals.py"):
        source = (EXAMPLE / "kfacbench_spirals" / name).read_text()
        source = source.replace('"signum",', '"signum2",')
        source = source.replace('name="spirals"', 'name="spirals2"')
        (package / name).write_text(source)
    (package / "__init__.py").write_text("")
    info = tmp_path / "spirals_pkg-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: spirals-pkg\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(
        "[kfacbench.methods]\nsignum = spirals_pkg.signum:METHODS\n\n"
        "[kfacbench.workloads]\nspirals = spirals_pkg.spirals:WORKLOADS\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.load_entry_points()
    assert METHODS["signum2"].origin == "entry point signum (spirals-pkg 0.3)"
    assert WORKLOADS["spirals2"].origin == "entry point spirals (spirals-pkg 0.3)"
    path = suite(tmp_path, optimizers="[optimizers.signum2]\n", workload="spirals2")
    cells = run(path, tmp_path)
    assert {c["status"] for c in cells.values()} == {"ok"} and len(cells) == 4


def test_the_docs_show_the_example_file_as_it_is() -> None:
    docs = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    assert MY_METHOD.strip() in docs


def test_list_shows_each_origin_and_takes_a_plugin_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "signsgd.py"
    file.write_text(MY_METHOD)
    assert cli.main(["list", "optimizers", "--plugin", str(file)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "origin" in out and "signsgd" in out and "kfacbench" in out
    assert cli.main(["list", "optimizers", "--plugin", str(tmp_path / "none.py")]) == 2
    assert "plugin" in capsys.readouterr().err
