"""Evaluation: acceptance length and speed of a draft through vLLM, prompt sets, the promotion gate."""
