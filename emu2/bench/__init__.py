"""Benchmarks: each prints JSON and compares implementations side by side in one run (ratios, not absolutes)."""
