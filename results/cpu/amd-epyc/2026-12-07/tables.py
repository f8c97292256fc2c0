"""Print the Markdown tables of this folder's README from its committed run folders.

    python results/cpu/amd-epyc/2026-12-07/tables.py

Step cost is amortized: training time / steps (refreshes included), with the median step beside
it; ratios divide by the SGD cell of the same run. Each entry is the median over the three runs
of a mode, with the range of the three.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from kfacbench.runs.rundir import amortized_step_ms

HERE = Path(__file__).resolve().parent
ORDER = {"sgd": 0, "kfac": 1, "kfac-fast": 2, "skfac": 3, "adamw": 4}


def runs(*parts: str) -> list[Path]:
    """The run folders under ``HERE/parts...``, oldest first."""
    return sorted(p for p in HERE.joinpath(*parts).iterdir() if p.is_dir())


def cells(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "cells.parquet")


def methods_table() -> str:
    frames = []
    for suite in ("subnormals_real", "subnormals_synthetic"):
        for mode in ("flush", "keep"):
            for i, run in enumerate(runs(suite, mode)):
                c = cells(run)
                if not (c["flush_denormal"] == (mode == "flush")).all():
                    raise SystemExit(f"{run}: flush_denormal does not match its folder")
                c["amortized"] = amortized_step_ms(c)
                sgd = c.loc[c["optimizer"] == "sgd"].set_index("workload")["amortized"]
                c["ratio"] = c["amortized"] / c["workload"].map(sgd)
                c["data"], c["mode"], c["run"] = suite.split("_")[1], mode, i
                frames.append(c)
    table = pd.concat(frames)
    keys = ["data", "workload", "batch_size", "optimizer", "mode"]
    g = table.groupby(keys).agg(
        amortized=("amortized", "median"),
        lo=("amortized", "min"),
        hi=("amortized", "max"),
        median=("median_step_ms", "median"),
        ratio=("ratio", "median"),
        rlo=("ratio", "min"),
        rhi=("ratio", "max"),
        loss=("final_train_loss", "median"),
    )
    wide = g.unstack("mode")
    lines = [
        "| data | workload (batch) | method | amortized step (ms), flushed | kept"
        " | median step (ms), flushed / kept | amortized / SGD, flushed | kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = sorted(wide.iterrows(), key=lambda kv: (*kv[0][:3], ORDER[kv[0][3]]))
    for (data, workload, batch, optimizer), r in rows:

        def ms(mode: str, r: pd.Series = r) -> str:
            return f"{r[('amortized', mode)]:.1f} ({r[('lo', mode)]:.1f}-{r[('hi', mode)]:.1f})"

        def ratio(mode: str, r: pd.Series = r) -> str:
            return f"{r[('ratio', mode)]:.2f} ({r[('rlo', mode)]:.2f}-{r[('rhi', mode)]:.2f})"

        lines.append(
            f"| {data} | {workload} ({batch}) | {optimizer} | {ms('flush')} | {ms('keep')}"
            f" | {r[('median', 'flush')]:.1f} / {r[('median', 'keep')]:.1f}"
            f" | {ratio('flush')} | {ratio('keep')} |"
        )
    same = (wide[("loss", "flush")] - wide[("loss", "keep")]).abs() / wide[("loss", "keep")]
    lines.append("")
    lines.append(f"Largest relative difference of a final training loss: {same.max():.1e}.")
    return "\n".join(lines)


def grid_table() -> str:
    steps: dict[str, dict[str, list[float]]] = {}
    for mode in ("flush", "keep"):
        for run in runs("subnormals_grid", mode):
            for rec in cells(run).to_dict("records"):
                h = json.loads(rec["hparams"])
                key = f"lr {h['lr']}, momentum {h['momentum']}"
                steps.setdefault(key, {}).setdefault(mode, []).append(rec["median_step_ms"])
    lines = [
        "| SGD setting | median step (ms), flushed: runs 1 / 2 / 3 | kept: runs 1 / 2 / 3 |",
        "|---|---|---|",
    ]
    for key, by_mode in sorted(steps.items()):
        flush, keep = (" / ".join(f"{v:.1f}" for v in by_mode[m]) for m in ("flush", "keep"))
        lines.append(f"| {key} | {flush} | {keep} |")
    for mode, name in (("flush", "flushed"), ("keep", "kept")):
        spreads = []
        for i in range(len(next(iter(steps.values()))[mode])):
            values = [by_mode[mode][i] for by_mode in steps.values()]
            spreads.append(f"{max(values) / min(values):.2f}")
        lines.append(f"| slowest / fastest setting, {name} | {' / '.join(spreads)} | |")
    return "\n".join(lines)


def wall_table() -> str:
    lines = [
        "| suite | commit | cells' wall time (s) | training (s) | training share |",
        "|---|---|---|---|---|",
    ]
    for suite in ("text_gpt_timing", "quick"):
        for folder in sorted(p.name for p in (HERE / suite).iterdir()):
            for run in runs(suite, folder):
                c = cells(run)
                env = json.loads((run / "env.json").read_text())
                if "wall_s" in c:
                    wall = c["wall_s"].sum()
                else:  # recorded before wall_s: first start to last finish, to the second
                    start = pd.to_datetime(c["started_at"]).min()
                    wall = (pd.to_datetime(c["finished_at"]).max() - start).total_seconds()
                train = c["train_time_s"].sum()
                lines.append(
                    f"| {suite} | {env['git_commit']} | {wall:.1f} | {train:.1f}"
                    f" | {train / wall:.1%} |"
                )
    return "\n".join(lines)


def inverse_table() -> str:
    """kfac_inverse: the median refresh (``inverse`` phase, 6 per cell) per inverse method."""
    run = HERE / "kfac_inverse"
    c = cells(run)
    phases = pd.read_parquet(run / "phases.parquet").merge(c[["cell_id", "workload", "hparams"]])
    phases["method"] = phases["hparams"].map(lambda h: json.loads(h).get("inverse_method"))
    refresh = phases[phases["phase"] == "inverse"].pivot_table(
        index="workload", columns="method", values="median_ms"
    )
    sgd = phases[(phases["phase"] == "step") & phases["method"].isna()].set_index("workload")
    lines = [
        "| workload (batch) | `eigh` (default) | `cholesky` | `inv` | eigh / cholesky | SGD step |",
        "|---|---|---|---|---|---|",
    ]
    batch = c.groupby("workload")["batch_size"].first()
    for workload in ("mnist_ae", "faces_ae", "cifar10_resnet20"):
        r = refresh.loc[workload]
        lines.append(
            f"| {workload} ({batch[workload]}) | {r['eigh']:.0f} | {r['cholesky']:.0f}"
            f" | {r['inv']:.0f} | {r['eigh'] / r['cholesky']:.1f} |"
            f" {sgd.loc[workload, 'median_ms']:.0f} |"
        )
    return "\n".join(lines)


def modern_speed_table() -> str:
    """modern_speed: amortized and median step per method, and each over AdamW's of the run."""
    c = cells(HERE / "modern_speed")
    c["amortized"] = amortized_step_ms(c)
    sharing = c["hparams"].map(lambda h: json.loads(h).get("weight_sharing", ""))
    c["name"] = c["optimizer"].where(c["optimizer"] != "kfac-fast", "kfac-fast " + sharing)
    names = ["adamw", "sgd", "kfac-fast expand", "kfac-fast reduce", "skfac", "singd"]
    names += ["shampoo", "soap"]
    lines = [
        "| method | text_gpt (32): amortized ms | / AdamW | median ms | / AdamW"
        " | ResNet-20 (128): amortized ms | / AdamW | median ms | / AdamW |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        parts = [name]
        for workload in ("text_gpt", "cifar10_resnet20"):
            w = c[c["workload"] == workload].set_index("name")
            a = w.loc["adamw"]
            x = w.loc[name]
            parts += [
                f"{x['amortized']:.0f}",
                f"{x['amortized'] / a['amortized']:.2f}",
                f"{x['median_step_ms']:.0f}",
                f"{x['median_step_ms'] / a['median_step_ms']:.2f}",
            ]
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("## Per method\n")
    print(methods_table())
    print("\n## The SGD grid\n")
    print(grid_table())
    print("\n## Wall time\n")
    print(wall_table())
    print("\n## kfac_inverse\n")
    print(inverse_table())
    print("\n## modern_speed\n")
    print(modern_speed_table())
