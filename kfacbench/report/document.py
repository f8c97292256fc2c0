"""A report as one list of sections, rendered to Markdown (``summary.md``) and to a
self-contained HTML page (``index.html``, figures embedded) through one template."""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

import pandas as pd

from kfacbench.errors import KfacbenchError
from kfacbench.report.data import ABSOLUTE_PATH, BASELINE, ReportData, load_runs
from kfacbench.report.figures import build_figures
from kfacbench.report.memory import MEMORY_NOTE, memory_display, memory_table
from kfacbench.report.plotting import save_figure
from kfacbench.report.scaling import (
    crossover_table,
    gemm_rates,
    phase_costs,
    slope_display,
    slope_table,
)
from kfacbench.report.tables import (
    baseline_name,
    busy_warnings,
    final_metric_table,
    graph_table,
    not_races,
    peer_table,
    step_time_table,
    time_to_target_display,
    time_to_target_table,
)


@dataclass
class Section:
    """One part of a report, rendered alike to Markdown and HTML (:func:`markdown`,
    :func:`html_page`): a heading (None for the opening lines), paragraphs, a bulleted list,
    warnings, a table, figures, and HTML-only collapsed blocks (the suites as run)."""

    title: str | None
    text: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    table: pd.DataFrame | None = None
    table_class: str = ""
    figures: list[tuple[str, str]] = field(default_factory=list)
    """(file name without ``.png``, caption)."""
    details: list[tuple[str, str]] = field(default_factory=list)
    """(summary, preformatted text): shown collapsed in the HTML page only."""


GRAPHS_NOTE = (
    "Settings run both eagerly and with cuda_graph = true (each step the method allows replayed"
    " from a whole-step CUDA graph; refreshes and warm-up steps stay eager). Amortized step"
    " (training time / steps) eager and graphed and their ratio (speedup, eager / graphed), the"
    " median step likewise, and the share of steps replayed; medians over seeds. Capturing is"
    " off the clock (the compile s column)."
)

TTT_NOTE = (
    "Every setting, with its median time to the target over seeds, or what happened instead. "
    "The speed-up is the best {name} setting's time to target (named in 'best {name}') over this "
    "setting's; when only one of the two reached the target, the other's time is at least the "
    "time it trained, which bounds the speed-up (> or <). ms/step is amortized: training time / "
    "steps, refreshes included."
)

STEP_NOTE = (
    "Amortized = training time / steps, refreshes included; the median step beside it; ratios to "
    "the {name} setting named in 'vs' (same suite, batch size and compile mode); medians over "
    "seeds."
)

FINAL_NOTE = (
    "Where each setting of a real-data workload ended: the final eval metric, median over seeds "
    "with their range, after the training time shown (equal for every setting of an equal-time "
    "suite; a race's cells stop at the target or the budget); best first."
)

PEERS_NOTE = (
    "ms as kfacbench / peer, paired on identical settings (one suite, batch size, inversion "
    "interval, data mode, device, TF32, AMP, eager; equal shared hyperparameters); amortized = "
    "training time / steps, refreshes included."
)

CLAIMS_NOTE = (
    "Each claim of the two papers (Martens & Grosse 2015; Tang et al. 2021), the value these runs "
    "measured, and the verdict by the rules under the table: the papers' experiments are "
    "GPU-sized, so a verdict is about the direction and rough size of an effect at this scale."
)

NO_TIMED_RUN = (
    "No timed run in this report (kfacbench run): it shows curvature diagnostics only "
    "(kfacbench diagnose)."
)

GROWTH_NOTE = (
    "How each phase's time grows along each swept axis, the others held: the slope b of"
    " log(time) on log(x), least squares over the cells, with its 95% interval [lo, hi] and in"
    " parentheses the FLOP model's slope over the same x (none: a method or phase the model does"
    " not cover, SKFAC's among them). Per call: the inverse per refresh; the amortized step is"
    " the steady state, every phase per step with the refresh once per T_inv. A slope below the"
    " model's says the phase is not arithmetic-bound at the small end (launches, memory, solver"
    " overheads); the crossovers below are read off the measured medians."
)

UNPUBLISHABLE = "Not publishable as it is"


def _cell(value: object) -> str:
    """A table cell as text: 4 significant digits, "-" where there is no number."""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "-"
    return str(value)


def _markdown_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(none)\n"
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        cells = [_cell(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _environment_lines(data: ReportData) -> list[str]:
    """The machines and versions of the runs (their commits are in the runs' lines)."""
    keys = ("device_name", "device_kind", "torch_version")
    return sorted(
        {", ".join(f"{k}: {env[k]}" for k in keys if env.get(k) is not None) for env in data.envs}
    )


def _run_lines(data: ReportData) -> list[str]:
    lines = []
    for run in data.runs:
        made = f", made by `{run.command}`" if run.command else ""
        note = f" ({run.note})" if run.note else ""
        lines.append(f"run `{run.path}`: commit {run.commit or 'unknown'}{made}{note}")
    return lines


def growth_section(data: ReportData) -> Section | None:
    """The slopes and crossovers of the cost-growth families (:mod:`kfacbench.report.scaling`),
    with each device's GEMM rate; None for runs that sweep no such axis."""
    costs = phase_costs(data.cells, data.phases)
    slopes = slope_table(costs)
    if slopes.empty:
        return None
    crossovers = crossover_table(costs)
    items = [f"{r.axis} ({r.family}, {r.fixed}): {r.finding}" for r in crossovers.itertuples()]
    items += [
        f"{name}: float32 GEMM at {rate:.4g} GFLOP/s, measured before the cells"
        for name, rate in sorted(gemm_rates(data.envs).items())
    ]
    return Section(
        "How the cost grows", text=[GROWTH_NOTE], table=slope_display(slopes), items=items
    )


def sections(
    data: ReportData,
    figures: list[tuple[str, str]],
    omitted: list[tuple[str, str]],
    claims: pd.DataFrame | None,
    claims_rules: list[str],
    command: str | None,
) -> list[Section]:
    """The report, in reading order: the command that rebuilds it (and why it could not be
    published, if so), the claims (when asked for), the runs it reads with their machines,
    commits and busy-machine warnings, the race to the target (only where there is one), the
    step cost, the peers, the memory (runs that recorded it), how the cost grows (runs of the
    cost-growth families), the figures and those not drawn."""
    problems = [p for run in data.runs for p in run.problems]
    out = [
        Section(
            None,
            text=[f"Rebuild: `{command}`"] if command else [],
            warnings=[f"{UNPUBLISHABLE}: {p}" for p in problems],
        )
    ]
    if claims is not None:
        out.append(
            Section(
                "The papers' claims, measured here",
                text=[CLAIMS_NOTE],
                table=claims,
                table_class="claims",
                items=claims_rules,
            )
        )
    out.append(
        Section(
            "Runs",
            items=[*_environment_lines(data), *_run_lines(data)],
            warnings=busy_warnings(data.cells),
            details=[(f"suite as run: {path}", text) for path, text in data.suites],
        )
    )
    if data.cells.empty:
        out.append(Section(None, text=[NO_TIMED_RUN]))
    else:
        skipped = not_races(data.cells)
        races = data.cells[~data.cells["workload"].astype(str).isin(skipped)]
        name = baseline_name(data.baseline)
        ttt = Section("Time to target")
        if not races.empty:
            ttt.text.append(TTT_NOTE.format(name=name))
            ttt.table = time_to_target_display(
                time_to_target_table(races, data.baseline), data.baseline
            )
            ttt.table_class = "ttt"
        ttt.items = [f"not drawn for {w}: {why}" for w, why in sorted(skipped.items())]
        cost = Section("Step cost", text=[STEP_NOTE.format(name=name)], table=step_time_table(data))
        # A timing-only report leads with what it measured: the cost, not an empty race.
        out += [ttt, cost] if not races.empty else [cost, ttt]
        final = final_metric_table(data.cells)
        if not final.empty:
            out.append(Section("At the end of training", text=[FINAL_NOTE], table=final))
        graphs = graph_table(data)
        if not graphs.empty:
            out.append(Section("CUDA graphs against eager steps", text=[GRAPHS_NOTE], table=graphs))
        peers = peer_table(data)
        if not peers.empty:
            out.append(Section("kfacbench vs peers", text=[PEERS_NOTE], table=peers))
        memory = memory_table(data.cells, data.baseline)
        if not memory.empty:
            note = MEMORY_NOTE.format(name=name)
            out.append(Section("Memory", text=[note], table=memory_display(memory, data.baseline)))
        growth = growth_section(data)
        if growth is not None:
            out.append(growth)
    out.append(Section("Figures", figures=figures))
    if omitted:
        out.append(Section("Figures not drawn", items=[f"{what}: {why}" for what, why in omitted]))
    return out


def markdown(title: str, parts: Sequence[Section]) -> str:
    """``summary.md``: the sections as GitHub Markdown (figures linked, not embedded)."""
    lines = [f"# {title}", ""]
    for part in parts:
        if part.title:
            lines += [f"## {part.title}", ""]
        for para in part.text:
            lines += [para, ""]
        for line in part.warnings:
            lines += [f"> **Warning**: {line}", ""]
        if part.table is not None:
            lines += [_markdown_table(part.table)]
        if part.items:
            lines += [*(f"- {item}" for item in part.items), ""]
        for name, caption in part.figures:
            lines += [f"![{name}]({name}.png)", "", caption, ""]
    return "\n".join(lines)


PAGE = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>$title</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } img { max-width: 100%; } figure { margin: 1.5em 0; }
figcaption { color: #666; font-size: 0.8em; } pre { background: #f7f7f7; padding: 1em; }
.warning { background: #fff3cd; border-left: 4px solid #e0a800; padding: 0.5em 1em; }
table.ttt td { white-space: nowrap; }
table.ttt td:nth-child(5), table.ttt td:nth-child(6), table.ttt td:nth-child(7) {
  text-align: left; white-space: normal; }
table.claims td { text-align: left; vertical-align: top; }
</style></head><body>
<h1>$title</h1>
$body
</body></html>
""")
SECTION = Template("<section>\n$heading$text$warnings$table$items$figures$details</section>\n")
FIGURE = Template(
    '<figure><img alt="$name" src="data:image/png;base64,$data">'
    "<figcaption>$caption ($name.png)</figcaption></figure>\n"
)
INLINE_CODE = re.compile(r"`([^`]+)`")
DETAILS = Template("<details><summary>$summary</summary><pre>$text</pre></details>\n")


def html_page(title: str, parts: Sequence[Section], folder: Path) -> str:
    """``index.html``: the same sections as one self-contained page (figures embedded from
    ``folder`` as data URIs: no network needed)."""

    def esc(text: str) -> str:  # text between tags: quotes stay, `code` as in the Markdown
        return INLINE_CODE.sub(r"<code>\1</code>", html.escape(text, quote=False))

    rendered = []
    for part in parts:
        table = ""
        if part.table is not None:
            table = part.table.to_html(
                index=False,
                classes=part.table_class or None,
                float_format=_cell,
                na_rep="-",
            )
        rendered.append(
            SECTION.substitute(
                heading=f"<h2>{esc(part.title)}</h2>\n" if part.title else "",
                warnings="".join(f'<p class="warning">{esc(w)}</p>\n' for w in part.warnings),
                text="".join(f"<p>{esc(t)}</p>\n" for t in part.text),
                table=table,
                items=(
                    "<ul>" + "".join(f"<li>{esc(i)}</li>" for i in part.items) + "</ul>\n"
                    if part.items
                    else ""
                ),
                figures="".join(
                    FIGURE.substitute(
                        name=html.escape(name),  # in an attribute too
                        caption=esc(caption),
                        data=base64.b64encode((folder / f"{name}.png").read_bytes()).decode(),
                    )
                    for name, caption in part.figures
                ),
                details="".join(
                    DETAILS.substitute(summary=esc(summary), text=esc(text))
                    for summary, text in part.details
                ),
            )
        )
    return PAGE.substitute(title=esc(title), body="".join(rendered))


def write_report(
    run_dirs: Sequence[Path],
    out: Path,
    claims: Callable[[ReportData], tuple[pd.DataFrame, list[str]]] | None = None,
    command: str | None = None,
    baseline: str = BASELINE,
) -> Path:
    """Write the figures, ``index.html`` and ``summary.md`` for ``run_dirs`` into ``out``.

    Args:
        run_dirs: the run directories (``run``, ``profile`` and ``diagnose`` runs).
        out: the report folder.
        claims: builds the table that opens both documents and the rules its verdicts follow
            (:func:`kfacbench.report.claims.claims_table`), or ``None`` for none.
        command: the command that rebuilds this report, written in its header (``kfacbench
            rebuild`` reads it back), or ``None``.
        baseline: the optimizer the speed-ups and step ratios divide by; another than SGD must
            have cells in the runs (AdamW for a transformer).

    Returns:
        The path of ``index.html``.

    Raises:
        KfacbenchError: ``out`` is not a folder and cannot become one, a run cannot be read
            (:func:`~kfacbench.report.data.load_runs`), or no cell of the runs has the
            ``baseline`` optimizer (other than SGD, whose absence the tables say).
    """
    if out.exists() and not out.is_dir():  # checked first: reading the runs can take a while
        raise KfacbenchError(f"{out}: exists and is not a folder; a report is a folder of files")
    data = load_runs(run_dirs)
    data.baseline = baseline
    present = sorted(set(data.cells["optimizer"].astype(str))) if not data.cells.empty else []
    if baseline != BASELINE and baseline not in present:
        raise KfacbenchError(
            f"--baseline {baseline}: no {baseline} cell in these runs (optimizers: "
            f"{', '.join(present) or 'none'})"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KfacbenchError(f"{out}: cannot create the report folder ({exc.strerror})") from None
    built = build_figures(data)
    try:
        figures = [(save_figure(fig, out, name), caption) for name, fig, caption in built.drawn]
    finally:
        built.close()
    table, rules = claims(data) if claims is not None else (None, [])
    parts = sections(data, figures, built.omitted, table, rules, command)
    names = set(data.cells["suite"].astype(str))
    if data.diagnostics is not None:
        names |= set(data.diagnostics["suite"].astype(str))
    title = f"kfacbench report: {', '.join(sorted(names))}"
    text = markdown(title, parts)
    shown = {run.path for run in data.runs}
    if leaked := sorted(set(ABSOLUTE_PATH.findall(text)) - shown):
        # Said once at the top, where a reader (and `kfacbench rebuild --check`) sees it.
        parts[0].warnings.insert(0, f"{UNPUBLISHABLE}: names paths of a machine: {leaked}")
        text = markdown(title, parts)
    (out / "summary.md").write_text(text)
    (out / "index.html").write_text(html_page(title, parts, out))
    return out / "index.html"
