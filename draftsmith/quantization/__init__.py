"""Fake quantization (ModelOpt) of a trained draft and its base, and the QAT finetune that follows it."""
