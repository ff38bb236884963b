"""Synthesis: the base model regenerates every assistant turn of the prompt conversations."""
