"""An example kfacbench plugin package: the Signum optimizer and the two-spirals workload."""
