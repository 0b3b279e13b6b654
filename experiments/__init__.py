"""attn experiments: tasks, data, training, evaluation, sweeps, comparison and benchmarks."""
