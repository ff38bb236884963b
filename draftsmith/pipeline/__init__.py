"""Stages, their fingerprinted output folders, and the runner that chains them."""
