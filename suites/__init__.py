"""Bundled suite files (installed as the ``kfacbench.suites`` package)."""
