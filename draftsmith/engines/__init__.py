"""Inference engines behind one interface: vLLM (CPU or GPU) and TensorRT-LLM."""
