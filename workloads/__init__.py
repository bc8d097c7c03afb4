"""Workload programs run inside the guest by `crashlab.workload`; each module has `run(ctx)`."""
