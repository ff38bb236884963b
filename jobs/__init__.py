"""Thin entry points, one per stage plus the pipeline; `ray job submit` runs them as modules."""
