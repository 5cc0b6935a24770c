"""Benchmarks (speed lives here, not in tests). Each has a thin wrapper in scripts/."""
