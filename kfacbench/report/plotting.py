"""What every figure shares: one colour per optimizer and lightness per setting, titles that
fit, log axes when a linear one would squeeze the data, and :class:`Figures`, the list of drawn
and omitted figures a report shows."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.text import Annotation, Text
from matplotlib.ticker import (
    FuncFormatter,
    LogLocator,
    NullFormatter,
)
from seaborn.external import husl

from kfacbench.optim import METHODS

LOG_AXIS_RATIO = 4.0
"""A loss figure's x axis is logarithmic when its longest curve ends more than this many times
later than its shortest: on a linear axis the short curves would fill under a quarter of it."""


# Solid for a best setting; dotted last, as it vanishes beside (and on top of) a solid line.
_DASHES = ["-", "--", "-.", (0, (5, 1, 1, 1)), (0, (3, 1, 1, 1, 1, 1)), ":"]


def optimizer_colors(optimizers: Sequence[str] = ()) -> dict[str, Any]:
    """One colour per optimizer, the same in every figure and report: registered methods in
    registry order, then any other name (a peer) after them."""
    names = list(METHODS) + sorted(set(optimizers) - set(METHODS))
    # The colourblind palette has 10 colours and repeats itself after them: further names get
    # the dark variants of the same hues (still told apart by lightness), then evenly spaced hues.
    palette = sns.color_palette("colorblind", 10) + sns.color_palette("dark", 10)
    if len(names) > len(palette):
        palette += sns.color_palette("husl", len(names) - len(palette))
    return dict(zip(names, palette[: len(names)], strict=True))


@dataclass
class Figures:
    """The figures of a report, in page order, and those left out with the reason."""

    drawn: list[tuple[str, Figure, str]] = field(default_factory=list)
    """(file name, figure, caption)."""
    omitted: list[tuple[str, str]] = field(default_factory=list)
    """(what the figure would have shown, why it is not drawn)."""

    def add(self, name: str, fig: Figure, caption: str) -> None:
        """Keep ``fig`` under ``name``, its titles wrapped to fit it (:func:`fit_titles`)."""
        fit_titles(fig)
        self.drawn.append((name, fig, caption))

    def omit(self, what: str, why: str) -> None:
        self.omitted.append((what, why))

    def close(self) -> None:
        for _, fig, _ in self.drawn:
            plt.close(fig)


def save_figure(fig: Figure, out: Path, name: str) -> str:
    fig.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
    fig.savefig(out / f"{name}.svg", bbox_inches="tight")
    plt.close(fig)
    return name


def title_texts(fig: Figure) -> list[Text]:
    """The figure's titles: its suptitle and every axes' centre, left and right title."""
    texts = [t for t in fig.texts if t.get_text()]  # fig.suptitle adds to fig.texts
    for ax in fig.axes:
        for loc in ("center", "left", "right"):
            text = _axes_title(ax, loc)
            if text.get_text():
                texts.append(text)
    return texts


def _axes_title(ax: Axes, loc: str) -> Text:
    # Axes keeps its three titles as separate Text artists; only the centre one is public.
    return {"center": ax.title, "left": ax._left_title, "right": ax._right_title}[loc]  # type: ignore[attr-defined]


def fit_titles(fig: Figure) -> None:
    """Wrap every title that is wider than the figure into lines that fit.

    ``bbox_inches="tight"`` would otherwise widen the saved image around an overlong title and
    leave the plot small inside it, or the title would overhang the plot it names.
    """
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    right = fig.bbox.x1
    for text in title_texts(fig):
        for _ in range(8):
            box = text.get_window_extent(renderer)
            allowed = (
                right - max(box.x0, fig.bbox.x0)
                if text.get_horizontalalignment() == "left"
                else fig.bbox.width
            )
            if box.x0 >= fig.bbox.x0 - 0.5 and box.x1 <= right + 0.5:
                break
            lines = text.get_text().splitlines()
            longest = max(len(line) for line in lines)
            width = max(12, int(longest * min(allowed / max(box.width, 1.0), 0.95)))
            text.set_text(
                "\n".join(textwrap.fill(line, width, break_long_words=False) for line in lines)
            )


def _shades(color: Any, n: int) -> list[tuple[float, float, float]]:
    """``n`` colours of ``color``'s hue and saturation at distinct lightness, the first exactly
    ``color``: each next one at the HUSL lightness farthest from those taken, within a range that
    stays visible on white (HUSL lightness is perceptual, so equal steps look equal)."""
    base = tuple(float(c) for c in matplotlib.colors.to_rgb(color))
    hue, saturation, lightness = husl.rgb_to_husl(*base)
    candidates = np.linspace(28.0, 74.0, 24)
    taken = [lightness]
    shades: list[tuple[float, float, float]] = [base]  # type: ignore[list-item]
    for _ in range(n - 1):
        pick = max(candidates, key=lambda c: min(abs(c - t) for t in taken))
        taken.append(float(pick))
        rgb = np.clip(husl.husl_to_rgb(hue, saturation, float(pick)), 0.0, 1.0)
        shades.append((float(rgb[0]), float(rgb[1]), float(rgb[2])))
    return shades


def setting_order(cells: pd.DataFrame) -> dict[str, int]:
    """Each setting's rank among its optimizer's settings on the same workload, best first:
    all seeds ok before any failure, then the sooner median time-to-target, then the lower
    median final training loss, then the name. The best gets the optimizer's own colour and
    line style, so the identity holds where it matters."""
    frame = pd.DataFrame(
        {
            "workload": cells["workload"],
            "optimizer": cells["optimizer"],
            "setting": cells["setting"],
            "failed": cells["status"] != "ok",
            "ttt": cells["time_to_target_s"].where(cells["status"] == "ok"),
            "loss": cells.get("final_train_loss", math.nan),
        }
    )
    per = (
        frame.groupby(["workload", "optimizer", "setting"])
        .agg(failed=("failed", "any"), ttt=("ttt", "median"), loss=("loss", "median"))
        .reset_index()
    )
    ranks: dict[str, int] = {}
    for _, group in per.groupby(["workload", "optimizer"]):
        ordered = group.sort_values(["failed", "ttt", "loss", "setting"], na_position="last")
        ranks.update({str(s): i for i, s in enumerate(ordered["setting"])})
    return ranks


def setting_colors(cells: pd.DataFrame, colors: dict[str, Any]) -> dict[str, Any]:
    """A colour per setting: its optimizer's hue, lightness varied per setting
    (:func:`_shades`), the best setting (:func:`setting_order`) exactly the optimizer's colour."""
    ranks = setting_order(cells)
    out: dict[str, Any] = {}
    settings = cells.drop_duplicates("setting")
    for (_, optimizer), group in settings.groupby(["workload", "optimizer"]):
        ordered = sorted((str(s) for s in group["setting"]), key=lambda s: ranks[s])
        out.update(zip(ordered, _shades(colors[str(optimizer)], len(ordered)), strict=True))
    return out


def setting_styles(cells: pd.DataFrame) -> dict[str, Any]:
    """A line style per setting, cycling within each optimizer from the best setting (solid):
    a second cue beside lightness, for print and colour-blind readers."""
    ranks = setting_order(cells)
    return {str(s): _DASHES[r % len(_DASHES)] for s, r in ranks.items()}


def median_band(
    runs: list[pd.DataFrame], x: str, log: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Median, min and max of the seeds' loss curves on a common grid of ``x``, over the range
    every seed has logged (no flat extrapolation before the first logged point); the grid is
    geometric when the axis is logarithmic, so early points are not all in the first pixel."""
    start = max(float(r[x].min()) for r in runs)
    end = min(float(r[x].max()) for r in runs)
    if end <= start:
        grid = np.array([start])
    elif log and start > 0:
        grid = np.geomspace(start, end, 120)
    else:
        grid = np.linspace(start, end, 120)
    values = np.stack([np.interp(grid, r[x], r["train_loss"]) for r in runs])
    return grid, np.median(values, 0), values.min(0), values.max(0)


def wants_log_axis(spans: Sequence[tuple[float, float]]) -> bool:
    """Whether curves spanning ``(start, end)`` each are shown better on a log axis: when the
    longest ends more than :data:`LOG_AXIS_RATIO` times later than the shortest (on a linear
    axis the short ones would fill a sliver of it), and every curve starts above zero."""
    if len(spans) < 2 or min(start for start, _ in spans) <= 0:
        return False
    ends = [end for _, end in spans]
    return max(ends) > LOG_AXIS_RATIO * min(ends)


def plain_log_ticks(axis: Any, subs: tuple[float, ...] = (1.0, 2.0, 5.0)) -> None:
    """Label a log axis at ``subs`` (1, 2 and 5) per decade in plain numbers (50, 100, 200),
    which a reader compares at a glance, rather than at decades as 10^2 (a loss range rarely
    spans one)."""
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def short_labels(settings: list[str], prefix: str) -> tuple[dict[str, str], str]:
    """Legend labels of ``settings`` without ``prefix`` (the workload) and without the
    ``key=value`` parts every setting shares, and those shared parts (for the legend's title):
    ``sgd bs=32 lr=0.1`` and ``adamw bs=32 lr=0.001`` become ``sgd lr=0.1``, ``adamw lr=0.001``
    with ``bs=32`` in common."""
    parts = {s: s.removeprefix(prefix).split() for s in settings}
    shared = set.intersection(*(set(p[1:]) for p in parts.values())) if len(parts) > 1 else set()
    first = next(iter(parts.values()), [])
    common = " ".join(t for t in first[1:] if t in shared)
    short = {s: " ".join(p[:1] + [t for t in p[1:] if t not in shared]) for s, p in parts.items()}
    return short, common


def fit_notes(fig: Figure, notes: Sequence[tuple[Axes, float, Annotation]]) -> None:
    """Make each note beside a bar readable without an axis that runs far past the data: the
    axis ends 5% after its longest bar; a note that does not fit beside its bar goes inside it
    (right-aligned on a white backing) when the bar is long enough, and only a note that fits
    neither widens the axis, to ``x·W / (W - w)`` for a note ``w`` pixels long at ``x``."""
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    limits: dict[Axes, float] = {}
    for ax, x, _ in notes:
        limits[ax] = max(limits.get(ax, 0.0), x * 1.05)
    inside: set[int] = set()
    for _ in range(3):  # widening an axis shortens every bar on it: decide again
        inside = set()
        wider = dict(limits)
        for i, (ax, x, text) in enumerate(notes):
            width, right = ax.bbox.width, limits[ax]
            need = text.get_window_extent(renderer).width + 12.0
            bar = x / right * width if right > 0 else 0.0
            if bar + need <= width:
                continue
            if bar >= need:
                inside.add(i)
            else:
                wider[ax] = max(wider[ax], x * width / max(width - need, 0.25 * width))
        if wider == limits:
            break
        limits = wider
    for i, (_, _, text) in enumerate(notes):
        text.set_horizontalalignment("right" if i in inside else "left")
        text.xyann = (-5, 0) if i in inside else (5, 0)
        if i in inside:
            text.set_bbox({"facecolor": "white", "alpha": 0.85, "edgecolor": "none", "pad": 1.0})
    for ax, right in limits.items():
        ax.set_xlim(0.0, right if right > 0 else 1.0)
