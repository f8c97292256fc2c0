"""The curvature diagnostics' figures (``kfacbench diagnose`` runs): the direction quality of
each approximation along training, the dense Fisher blocks and their inverses (Martens & Grosse
2015, Figs. 2-3), and SKFAC's factor error against rank."""

from __future__ import annotations

import math
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import (
    NullLocator,
)

from kfacbench.diagnostics.dense import read_heatmaps
from kfacbench.report.data import ReportData
from kfacbench.report.format import plural
from kfacbench.report.plotting import Figures
from kfacbench.runs.store import settings_of

MAX_DIAGNOSED_CELLS = 8
"""Cells of a report given their own curvature figures (quality, dense heatmaps, rank), at most:
the first by label; the others are listed as not drawn (diagnostics.parquet holds them all)."""


_APPROXIMATION_STYLES = {
    "gradient": ("sgd", "-"),
    "kfac": ("kfac", "-"),
    "kfac-exact-damping": ("kfac", "--"),
    "kfac-tridiag": ("kfac-tridiag", "-"),
    "skfac": ("skfac", "-"),
    "skfac-sum": ("skfac", "-"),
    "skfac-subsample": ("skfac-subsample", "-"),
}
"""Each approximation of ``kfacbench diagnose`` (without its ``[fisher]`` tag): the optimizer
whose colour it is drawn in (the one that takes that step; SGD's for the gradient), and a line
style that tells apart two approximations of one optimizer."""


_RANK_METRICS = (
    ("factor_a_error", "factor Ā"),
    ("factor_g_error", "factor G"),
    ("kronecker_error", "Ā ⊗ G"),
    ("inverse_error", "damped inverse on ∇h"),
)


def approximation_style(name: str, optimizer: str, colors: dict[str, Any]) -> tuple[Any, Any]:
    """Colour and line style of an approximation (:data:`_APPROXIMATION_STYLES`): ``run``, the
    cell's own optimizer with its stale inverses, is that optimizer's colour, dotted."""
    base = name.split("[")[0]
    if base == "run":
        return colors.get(optimizer, "0.2"), ":"
    owner, style = _APPROXIMATION_STYLES.get(base, ("", "-."))
    return colors.get(owner, "0.45"), style


def _diagnosed(
    table: pd.DataFrame, figs: Figures, what: str, one_seed: bool = False
) -> list[tuple[str, str, str]]:
    """``(cell id, label, optimizer)`` of the cells of ``table`` to draw, the first
    :data:`MAX_DIAGNOSED_CELLS` by label, with the others listed as not drawn. ``one_seed``:
    only the first seed of each setting (its other seeds' figures would look the same; their
    numbers are in the quality figure and ``diagnostics.parquet``)."""
    cells = table.drop_duplicates("cell_id").sort_values("label")
    if one_seed:
        first = cells.assign(setting=settings_of(cells["label"].astype(str)))
        first = first.drop_duplicates("setting")
        if len(first) < len(cells):
            figs.omit(
                f"{what} of {plural(len(cells) - len(first), 'more seed')}",
                "one seed per setting is drawn; the other seeds' errors are in diagnostics.parquet",
            )
        cells = first
    if len(cells) > MAX_DIAGNOSED_CELLS:
        figs.omit(
            f"{what} of {plural(len(cells) - MAX_DIAGNOSED_CELLS, 'more cell')}",
            f"at most {MAX_DIAGNOSED_CELLS} cells are drawn; diagnostics.parquet holds them all",
        )
    return [
        (str(r.cell_id), str(r.label), str(r.optimizer))
        for r in cells.head(MAX_DIAGNOSED_CELLS).itertuples(index=False)
    ]


def quality_figures(diag: pd.DataFrame, colors: dict[str, Any], figs: Figures) -> None:
    """Cosine and model-reduction ratio of every approximation's direction against the exact
    natural gradient, along training: one row of panels per cell, one figure per suite."""
    scores = diag[(diag["layer"] == "all") & diag["metric"].isin(["cosine", "model_ratio"])]
    if scores.empty:
        figs.omit("curvature quality along training", "the diagnose runs recorded no scores")
        return
    for suite, frame in scores.groupby("suite"):
        shown = _diagnosed(frame, figs, f"{suite}: curvature quality")
        fig, axes = plt.subplots(
            len(shown), 2, figsize=(12, 2.9 * len(shown) + 1.0), squeeze=False, sharex="row"
        )
        handles: dict[str, Any] = {}
        for row, (cell_id, label, optimizer) in enumerate(shown):
            cell = frame[frame["cell_id"] == cell_id]
            for ax, metric, what in zip(
                axes[row],
                ("cosine", "model_ratio"),
                ("cosine with δ*", "model ratio M(α*Δ) / M(δ*)"),
                strict=True,
            ):
                for name, g in cell[cell["metric"] == metric].groupby("approximation"):
                    color, style = approximation_style(str(name), optimizer, colors)
                    g = g.sort_values("step")
                    (line,) = ax.plot(
                        g["step"], g["value"], color=color, linestyle=style, marker="o",
                        markersize=4, linewidth=1.8, label=str(name),
                    )  # fmt: skip
                    handles.setdefault(str(name), line)
                ax.set_ylabel(what)
                ax.grid(True, alpha=0.3)
            axes[row, 0].set_title(label, loc="left", fontsize=plt.rcParams["axes.labelsize"])
        for ax in axes[-1]:
            ax.set_xlabel("training step")
        names = sorted(handles)
        fig.legend(
            [handles[n] for n in names], names, title="direction", loc="center left",
            bbox_to_anchor=(1.0, 0.5), frameon=False,
        )  # fmt: skip
        fig.suptitle(f"{suite}: each approximation's step against the exact natural gradient")
        fig.tight_layout()
        figs.add(
            f"diagnostics_quality_{suite}",
            fig,
            "Cosine and model-reduction ratio (the fraction of the exact quadratic model's "
            "reduction achieved at the best step length) of each approximation's direction "
            "against δ* = −(F + λI)⁻¹∇h, on the fixed diagnostic batch at each checkpoint. "
            "Colours are the optimizers that take that step (the gradient: SGD's); `run` is the "
            "cell's own optimizer with the inverses it holds (dotted).",
        )


def _dense_titles(rows: pd.DataFrame) -> dict[str, str]:
    """Each heatmap's title, with the relative errors recorded for it."""
    keys = zip(
        rows["approximation"].astype(str).str.split("[").str[0],
        rows["metric"].astype(str),
        strict=True,
    )
    values = dict(zip(keys, rows["value"].astype(float), strict=True))

    def errors(name: str, what: str) -> str:
        whole = values.get((name, what), math.nan)
        diag = values.get((name, f"{what}_diag"), math.nan)
        off = values.get((name, f"{what}_off"), math.nan)
        text = f"error {whole:.3g}\n(diagonal blocks {diag:.3g}"
        return text + (f", off {off:.3g})" if math.isfinite(off) else ")")

    return {
        "fisher": "|F|, exact Fisher",
        "kronecker": f"|F̃|, K-FAC, all blocks\n{errors('kfac', 'fisher_error')}",
        "kronecker_difference": "|F̃ − F|",
        "inverse_exact": "|(F + λI)⁻¹|, exact",
        "inverse_kfac": f"|F̃⁻¹|, block-diagonal\n{errors('kfac', 'inverse_error')}",
        "inverse_tridiag": f"|F̂⁻¹|, block-tridiagonal\n{errors('kfac-tridiag', 'inverse_error')}",
    }


DENSE_PIXELS = 256
"""Largest side of a heatmap as drawn: the stored maps (up to 512) are max-pooled further, so a
page of heatmaps stays a few hundred kB (at 512 pixels of noise-like entries, two such figures
made an 8 MB page)."""


def max_pool(values: np.ndarray, factor: int) -> np.ndarray:
    """``values`` max-pooled over ``factor`` × ``factor`` tiles (edge tiles partial)."""
    if factor == 1:
        return values
    rows, cols = -(-values.shape[0] // factor), -(-values.shape[1] // factor)
    padded = np.full((rows * factor, cols * factor), -np.inf, dtype=values.dtype)
    padded[: values.shape[0], : values.shape[1]] = values
    return padded.reshape(rows, factor, cols, factor).max(axis=(1, 3))


def dense_figures(data: ReportData, figs: Figures) -> None:
    """Martens & Grosse's Figs. 2–3 for each cell at its last checkpoint: |F|, |F̃| and their
    difference, and the damped inverses |(F + λI)⁻¹|, |F̃⁻¹|, |F̂⁻¹|, over the dense layers."""
    assert data.diagnostics is not None
    diag = data.diagnostics
    dense = diag[diag["layer"].astype(str).str.startswith("dense:")]
    if dense.empty:
        figs.omit(
            "dense Fisher heatmaps",
            "no dense diagnostics in these runs (no run of Linear layers within --dense-budget,"
            " or --no-dense)",
        )
        return
    base = matplotlib.colormaps["magma_r"]
    cmap = base.with_extremes(bad=base(0.0))  # exact zeros (blocks left out) as the smallest
    for cell_id, label, _ in _diagnosed(dense, figs, "dense heatmaps", one_seed=True):
        rows = dense[dense["cell_id"] == cell_id]
        step = int(rows["step"].max())
        path = data.heatmaps.get((cell_id, step))
        if path is None:
            figs.omit(f"dense heatmaps of {label}", f"no heatmap file for step {step} in dense/")
            continue
        maps = read_heatmaps(path)
        rows = rows[rows["step"] == step]
        titles = _dense_titles(rows)
        shown = max(1, -(-maps["fisher"].shape[0] // DENSE_PIXELS))  # display pooling
        offsets = maps["offsets"] / (int(maps["pool"]) * shown)
        names = [str(n) for n in maps["layers"]]
        fig, axes = plt.subplots(2, 3, figsize=(12, 8.5), layout="constrained")
        grid = (
            ("fisher", "kronecker", "kronecker_difference"),
            ("inverse_exact", "inverse_kfac", "inverse_tridiag"),
        )
        for row, keys in enumerate(grid):
            top = float(maps[keys[0]].max())  # the exact matrix's scale for the whole row
            norm = matplotlib.colors.LogNorm(vmin=max(top, 1e-300) * 1e-4, vmax=max(top, 1e-300))
            for ax, key in zip(axes[row], keys, strict=True):
                if key == "inverse_tridiag" and np.array_equal(maps[key], maps["inverse_kfac"]):
                    # One layer (or none adjacent): no off-diagonal blocks, the same inverse.
                    ax.axis("off")
                    ax.text(0.5, 0.5, "block-tridiagonal: identical to\nblock-diagonal here "
                            "(no adjacent\nlayers), not drawn", ha="center", va="center",
                            transform=ax.transAxes)  # fmt: skip
                    continue
                values = np.ma.masked_less_equal(max_pool(maps[key], shown), 0.0)
                image = ax.imshow(values, cmap=cmap, norm=norm, interpolation="nearest")
                for edge in offsets[1:-1]:
                    ax.axhline(edge - 0.5, color="0.5", linewidth=0.6)
                    ax.axvline(edge - 0.5, color="0.5", linewidth=0.6)
                centres = (offsets[:-1] + offsets[1:]) / 2 - 0.5
                ax.set_xticks(centres, names)
                ax.set_yticks(centres, names)
                ax.grid(False)
                ax.set_title(titles[key], fontsize=plt.rcParams["axes.labelsize"])
            fig.colorbar(image, ax=list(axes[row]), shrink=0.85, label="|entry|, log scale")
        params = int(maps["offsets"][-1])
        span = f"{names[0]}..{names[-1]}" if len(names) > 1 else names[0]
        fig.suptitle(
            f"{label}, step {step}: layers {span} ({params:,} parameters), "
            f"λ = {float(maps['damping']):.3g}"
        )
        figs.add(
            f"diagnostics_dense_{cell_id}",
            fig,
            f"{label} at step {step}: the exact Fisher F of layers {span} against K-FAC's "
            "Kronecker approximation F̃ with every block (Martens & Grosse Fig. 2), and the exact "
            "damped inverse against K-FAC's block-diagonal (factored damping) and "
            "block-tridiagonal inverses (Fig. 3). |entries| max-pooled to at most 256 pixels, on "
            "a log scale spanning 4 decades below the exact matrix's largest entry, per row; "
            "errors are relative Frobenius norms.",
        )


def rank_figures(diag: pd.DataFrame, figs: Figures) -> None:
    """SKFAC's errors against the rank of its factors (examples used), one line per layer, one
    row of panels per reduction, for each cell at its last checkpoint."""
    ranked = diag[diag["rank"].notna()]
    if ranked.empty:
        figs.omit("SKFAC's error against rank", "not measured in these runs (--no-rank)")
        return
    for cell_id, label, _ in _diagnosed(ranked, figs, "SKFAC's error against rank", one_seed=True):
        rows = ranked[ranked["cell_id"] == cell_id]
        step = int(rows["step"].max())
        rows = rows[rows["step"] == step]
        reductions = sorted(rows["approximation"].unique())
        layers = list(dict.fromkeys(rows["layer"].astype(str)))
        palette = sns.color_palette("viridis", len(layers))
        fig, axes = plt.subplots(
            len(reductions), len(_RANK_METRICS), figsize=(16, 3.6 * len(reductions) + 1.0),
            squeeze=False, sharex=True,
        )  # fmt: skip
        ranks = sorted(int(r) for r in rows["rank"].unique())
        for i, reduction in enumerate(reductions):
            for ax, (metric, what) in zip(axes[i], _RANK_METRICS, strict=True):
                panel = rows[(rows["approximation"] == reduction) & (rows["metric"] == metric)]
                for color, layer in zip(palette, layers, strict=True):
                    line = panel[panel["layer"] == layer].sort_values("rank")
                    ax.plot(
                        line["rank"].astype(float), line["value"], color=color, marker="o",
                        markersize=3.5, linewidth=1.5, label=layer,
                    )  # fmt: skip
                ax.set_xscale("log", base=2)
                ax.set_xticks(ranks, [str(r) for r in ranks])
                ax.xaxis.set_minor_locator(NullLocator())
                # Errors span decades (a reduce-sum Ā is |T|² times K-FAC's by convention).
                if (panel["value"] > 0).all() and not panel.empty:
                    ax.set_yscale("log")
                else:
                    ax.set_ylim(bottom=0.0)
                ax.set_title(what, fontsize=plt.rcParams["axes.labelsize"])
                ax.grid(True, alpha=0.3)
            axes[i, 0].set_ylabel(f"{reduction}\nrelative error vs K-FAC, log scale")
        for ax in axes[-1]:
            ax.set_xlabel("rank r (examples), log scale")
        handles, names = axes[0, 0].get_legend_handles_labels()
        fig.legend(
            handles, names, title="layer", loc="center left", bbox_to_anchor=(1.0, 0.5),
            frameon=False,
        )  # fmt: skip
        fig.suptitle(f"{label}, step {step}: SKFAC's rank-r factors against K-FAC's")
        fig.tight_layout()
        figs.add(
            f"diagnostics_rank_{cell_id}",
            fig,
            f"{label} at step {step}: SKFAC's factors from the first r examples of the diagnostic "
            f"batch against K-FAC's from all {ranks[-1]}, per layer: relative Frobenius errors of "
            "Ā, G and Ā ⊗ G, and of the damped inverse (√λ on each factor, both sides) applied "
            "to the layer's gradient, on log axes. Scale convention: under reduce-sum SKFAC's Ā "
            "is built from sums over a conv layer's |T| output positions where K-FAC's averages "
            "the patch rows, so it grows with |T|² and its relative error measures that scale, "
            "whatever the rank (a convention, not an approximation error); subsample is on "
            "K-FAC's scale.",
        )


def diagnostic_figures(data: ReportData, colors: dict[str, Any], figs: Figures) -> None:
    """The figures of ``kfacbench diagnose`` runs, when the report has any."""
    if data.diagnostics is None:
        figs.omit("curvature diagnostics", "no diagnose run in this report (kfacbench diagnose)")
        return
    quality_figures(data.diagnostics, colors, figs)
    dense_figures(data, figs)
    rank_figures(data.diagnostics, figs)
