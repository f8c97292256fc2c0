"""Plotted comparison reports: seaborn figures (PNG + SVG), one self-contained HTML page, Markdown.

``kfacbench report RUN_DIR [RUN_DIR ...] -o DIR`` reads the tables of one or more runs and writes:

- ``loss_<workload>.{png,svg}``: training loss vs wall-clock time and vs steps, the median over
  seeds with a min-max band (curves are interpolated onto a common grid per setting, since seeds
  do not log at the same seconds); an axis is logarithmic when the longest curve spans more than
  :data:`LOG_AXIS_RATIO` times the shortest (one long run would squeeze the others into a corner);
- ``time_to_target.{png,svg}``: every setting, one panel per workload: a bar to its median
  time-to-target with the speed-up over the best SGD setting, or a hatched bar to the time it
  trained without reaching the target (so a setting that lost still shows, with what it cost);
- ``phases.{png,svg}``: the per-step time broken down by phase (amortised: a phase's total time
  over the cell's steps, so refreshes every T steps count 1/T), stacked;
- ``scaling_<axis>.{png,svg}``: step time vs batch size, vs inversion interval and vs layer width
  (the ``wide_ae_W`` workloads), for whichever of these axes the runs swept;
- ``kernels.{png,svg}``: the top kernels per optimizer and phase, when a kernels table exists;
- ``performance_profile.{png,svg}``: across workloads, the fraction of workloads on which each
  optimizer's time-to-target is within τ of the best (AlgoPerf's performance profile, τ ≤ 4);
- from ``kfacbench diagnose`` run directories (``diagnostics.parquet``):
  ``diagnostics_quality_<suite>`` (cosine and model ratio of every approximation's direction
  against the exact natural gradient, along training, one line per approximation in the colour
  of the optimizer that takes it), ``diagnostics_dense_<cell-id>`` (|F|, |F̃|, |F̃ − F| and the
  damped inverses |(F + λI)⁻¹|, |F̃⁻¹|, |F̂⁻¹| of the dense layers at the last checkpoint, as in
  Martens & Grosse's Figs. 2–3) and ``diagnostics_rank_<cell-id>`` (SKFAC's factor errors against
  rank, per layer and reduction); a report may hold diagnose runs only;
- ``index.html`` (figures embedded as data URIs: no network needed) and ``summary.md``.

A figure that would carry no information for the runs given (a performance profile of one
workload, a scaling plot of an axis that was not swept) is not drawn; both documents list it
with the reason, so its absence is not mistaken for a failure.

Every figure gives an optimizer the same colour (:func:`optimizer_colors`), drawn exactly (no
seaborn desaturation of bars); settings of one optimizer keep its hue and differ in lightness
(:func:`setting_colors`), the best setting in exactly the optimizer's colour.
"""

from kfacbench.report.data import ReportData, load_runs
from kfacbench.report.document import write_report

__all__ = ["ReportData", "load_runs", "write_report"]
