"""Export for the inference runtimes: the draft in their format, the quantized base, and the engine configs."""
