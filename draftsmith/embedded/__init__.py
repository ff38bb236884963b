"""The embedded default base: generated conversations, BPE tokenizer, a small Llama pretrained on CPU."""
