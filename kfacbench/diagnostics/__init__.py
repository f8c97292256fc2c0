"""Curvature diagnostics (``kfacbench diagnose``): each approximation's quality against the exact
damped natural gradient along training (:mod:`~kfacbench.diagnostics.quality`), and the dense
Fisher, its Kronecker approximation and their inverses on a few layers, with SKFAC's factor error
against rank (:mod:`~kfacbench.diagnostics.dense`)."""
