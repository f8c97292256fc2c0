"""Run directories: the tables' schema, writing (:mod:`~kfacbench.runs.store`) and reading
(:mod:`~kfacbench.runs.rundir`) them, the summary printed after a run, comparing two runs and the
speed-regression check against a baseline, and the environment a run records."""
