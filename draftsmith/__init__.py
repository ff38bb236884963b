"""draftsmith: train, quantize, export, register and serve speculative-decoding drafts on Ray."""

__version__ = "0.1.0"
