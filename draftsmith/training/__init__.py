"""Distributed training plumbing shared by the base pretraining and the draft trainer."""
