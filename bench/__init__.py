"""Benchmarks of the daemon beside its ceilings, measured in the same run; see README.md."""
