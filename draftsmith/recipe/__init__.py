"""Recipes: the typed schema of every stage's settings and its YAML loader."""
