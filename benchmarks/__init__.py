"""Benchmarks; the ones that import ``experiments`` run as modules from the repository root,
e.g. ``python -m benchmarks.bench_end_to_end --quick``."""
