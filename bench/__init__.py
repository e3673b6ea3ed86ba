"""Mindchart benchmarks (issue 8): ratios measured side by side in one run, never timed asserts.

Run `python -m bench [--quick]` (or `make bench` / `make bench-quick`); see bench/README.md.
"""
