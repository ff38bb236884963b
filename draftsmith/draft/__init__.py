"""The draft module: its architecture, conversion onto the base, vocabulary, objective and checkpoints."""
