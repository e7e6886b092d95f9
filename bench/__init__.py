"""Benchmarks and soak runs: scripts that print figures, not timed tests."""
