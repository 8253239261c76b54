"""Benchmarks whose scripts live in scripts/."""
