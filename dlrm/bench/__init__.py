"""Benchmarks behind scripts/bench*.py; figures and commands in docs/benchmarks.md."""
