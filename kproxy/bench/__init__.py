"""Benchmarks a person runs by hand (scripts/bench-*); results live in docs/."""
