"""Benchmarks of wadi.py and lorad.py, one file each; run them as `python bench.py NAME` (see bench.py)."""
