"""The chat templates real models publish (tests/data/chat_templates, read from their tokenizer configs; see
SOURCES.md there) on the test base's tokenizer, for the tests of what draftsmith derives from a template."""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken
from transformers import AutoTokenizer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

# Per template: its special tokens, (bos, eos) as the model's tokenizer config sets them, the generation
# config's extra end-of-turn tokens, whether it takes a system message, and what ends an assistant turn.
MODELS = {
    "llama3.1": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|eom_id|>"], ("<|begin_of_text|>", "<|eot_id|>"),
                 ["<|end_of_text|>", "<|eom_id|>"], True, "<|eot_id|>"),
    "qwen2.5": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], (None, "<|im_end|>"), ["<|endoftext|>"], True,
                "<|im_end|>"),
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"], (None, "<|im_end|>"),
              ["<|endoftext|>"], True, "<|im_end|>"),
    "chatml-smollm2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ("<|im_start|>", "<|im_end|>"), [], True,
                       "<|im_end|>"),
    "mistral": (["<s>", "</s>"], ("<s>", "</s>"), [], True, "</s>"),
    # Gemma's tokenizer EOS is <eos>; its turns end with <end_of_turn>, which only its generation config names.
    "gemma2": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], ("<bos>", "<eos>"), ["<end_of_turn>"], False,
               "<end_of_turn>"),
}

def tokenizer_for(base_dir: Path, name: str):
    """The test base's byte-level BPE with the model's special tokens, its bos/eos and its published template."""
    special, (bos, eos), extra_eos, _, _ = MODELS[name]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in special], special_tokens=True)
    tokenizer.bos_token, tokenizer.eos_token = bos, eos
    tokenizer.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
    return tokenizer, [tokenizer.convert_tokens_to_ids(t) for t in extra_eos]
