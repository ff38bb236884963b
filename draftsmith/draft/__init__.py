"""The draft module: the algorithms (one module each), conversion onto the base, vocabulary and checkpoints."""
