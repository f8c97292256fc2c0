"""Small suites shared by tests that need real runs and traces (CPU, synthetic data, seconds)."""

PROFILED = """
name = "{name}"
[defaults]
device = "cpu"
data = "synthetic"
max_steps = 8
eval_every = 4
log_every = 4
train_eval_size = 200
[sweep]
workload = ["curves_ae"]
batch_size = [64]
inv_interval = [2]
[optimizers.sgd]
lr = 0.01
[optimizers.skfac]
damping = 1.0
lr = 0.01
"""
"""SGD and SKFAC on curves_ae: every SKFAC phase, two cells."""
