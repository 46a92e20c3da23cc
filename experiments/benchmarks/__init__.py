"""Measurement scripts (not tests, not installed): ratios measured side by side in one run.

Run them from a checkout, e.g. ``python -m experiments.benchmarks.bench_models --preset demo``; the results
and their commands are in ``experiments/BENCHMARKS.md``. The package is left out of the built wheel.
"""
