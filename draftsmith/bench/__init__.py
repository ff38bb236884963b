"""Benchmarks of each stage on the embedded default, written as one results table (markdown + JSON)."""
