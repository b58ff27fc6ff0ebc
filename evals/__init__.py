"""Evaluation: tasks, metrics, benchmarks (installed as ``tokenprune.evals``)."""
