"""Assistant-token masks for the chat templates real models publish (tests/data/chat_templates, read from their
tokenizer configs; see SOURCES.md there), none of which carries `{% generation %}` tags."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from chat_templates import MODELS, tokenizer_for
from draftsmith.embedded.tokenizer import CHAT_TEMPLATE
from draftsmith.training.assistant_mask import ChatTemplateMaskError, assistant_mask, has_generation_tags
from draftsmith.training.draft_data import DraftDataError, prepare_training_data

ANSWERS = ["Hello! How can I help?", "12 + 7 = 19."]


def conversation(system: bool) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "Be brief."}] if system else []
    return messages + [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": ANSWERS[0]},
                       {"role": "user", "content": "What is 12 plus 7?"}, {"role": "assistant", "content": ANSWERS[1]}]


def masked_runs(tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    runs, current = [], []
    for token, keep in zip(ids, mask, strict=True):
        if keep:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_published_template_masks_exactly_the_assistant_turns(tiny_base, name):
    tokenizer, extra_eos = tokenizer_for(tiny_base, name)
    assert not has_generation_tags(tokenizer.chat_template)
    takes_system, turn_end = MODELS[name][3], MODELS[name][4]
    messages = conversation(system=takes_system)
    ids, mask = assistant_mask(tokenizer, messages, extra_eos)
    # the very tokens the template's own tokenization gives
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    # The model's own output after each prompt: its answer and the stop token it must learn, nothing of the
    # prompt, the system message or the user's turns. Qwen 3 writes an empty thinking block before its final
    # answer (the template puts it there), and Mistral a space before each.
    expected = [f"{answer}{turn_end}" for answer in ANSWERS]
    if name == "qwen3":
        expected[1] = f"<think>\n\n</think>\n\n{expected[1]}"
    if name == "mistral":
        expected = [f" {e}" for e in expected]
    assert masked_runs(tokenizer, ids, mask) == expected


def test_gemmas_turn_end_needs_its_generation_config(tiny_base):
    """Without the generation config's <end_of_turn>, the turn would end at the content: the draft would never
    learn to stop."""
    tokenizer, _ = tokenizer_for(tiny_base, "gemma2")
    ids, mask = assistant_mask(tokenizer, conversation(system=False))
    assert masked_runs(tokenizer, ids, mask) == ANSWERS


def test_derived_mask_equals_the_generation_tags_mask(tiny_base):
    """On the embedded template, which has the tags, the derived spans give the very mask the tags give."""
    tagged = AutoTokenizer.from_pretrained(tiny_base)
    assert has_generation_tags(tagged.chat_template)
    untagged = AutoTokenizer.from_pretrained(tiny_base)
    untagged.chat_template = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    for system in (False, True):
        messages = conversation(system)
        assert assistant_mask(untagged, messages) == assistant_mask(tagged, messages)
        assert sum(assistant_mask(untagged, messages)[1]) > 0


def test_templates_that_hide_the_assistant_tokens_are_refused(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.chat_template = "{{ messages|length }}" + CHAT_TEMPLATE.replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")
    with pytest.raises(ChatTemplateMaskError, match="before assistant turn 1 differently"):
        assistant_mask(tokenizer, conversation(False))
    tokenizer.chat_template = CHAT_TEMPLATE.replace("{% generation %}{{ message['content'] ~ eos_token }}",
                                                    "{{ message['content'] | upper ~ eos_token }}").replace(
        "{% endgeneration %}", "")
    with pytest.raises(ChatTemplateMaskError, match="rewrites the content of assistant turn 1"):
        assistant_mask(tokenizer, conversation(False))


def test_dataset_stage_trains_on_a_model_with_a_published_template(tiny_base, local_ray, tmp_path):
    """A tiny random-weight Llama carrying Llama 3.1's template and generation config: the dataset stage
    tokenizes it with the derived masks (before, such a model had no usable conversation)."""
    tokenizer, extra_eos = tokenizer_for(tiny_base, "llama3.1")
    model_dir = tmp_path / "llama3-tiny"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                 head_dim=16)).to(torch.bfloat16).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    GenerationConfig(eos_token_id=[tokenizer.eos_token_id, *extra_eos]).save_pretrained(model_dir)
    data = tmp_path / "conversations.jsonl"
    data.write_text("".join(json.dumps({"messages": conversation(True), "conversation_id": f"c{i}"}) + "\n"
                            for i in range(12)))
    out = tmp_path / "out"
    summary = prepare_training_data([str(data)], model_dir, out, max_seq_len=512, validation_share=0.5,
                                    max_bad_share=0.0, vocab_size=len(tokenizer))
    assert summary["usable"] == 12 and summary["quarantined"] == 0
    expected_targets = len(tokenizer("".join(f"{a}<|eot_id|>" for a in ANSWERS), add_special_tokens=False).input_ids)
    assert summary["target_tokens"] == 12 * expected_targets

    tokenizer.chat_template = "{{ messages|length }}" + tokenizer.chat_template  # prefixes no longer agree
    tokenizer.save_pretrained(model_dir)
    with pytest.raises(DraftDataError, match="none of the 12 .* differently from the whole conversation"):
        prepare_training_data([str(data)], model_dir, tmp_path / "out2", max_seq_len=512, validation_share=0.5,
                              max_bad_share=0.0, vocab_size=len(tokenizer))


def test_a_turn_cut_at_its_token_limit_does_not_teach_its_stop_token(tiny_base):
    """Synthesis records a turn cut at max_tokens_per_turn; the template still closes it with its stop token,
    which the base never chose there: that one token leaves the mask, the rest of the turn stays."""
    chatml, _ = tokenizer_for(tiny_base, "chatml-smollm2")
    messages = conversation(system=True)
    ids, mask = assistant_mask(chatml, messages, truncated=[True, False])
    assert masked_runs(chatml, ids, mask) == [ANSWERS[0], f"{ANSWERS[1]}<|im_end|>"]
    tagged = AutoTokenizer.from_pretrained(tiny_base)  # the generation-tags path: the same rule
    ids, mask = assistant_mask(tagged, messages, truncated=[False, True])
    assert masked_runs(tagged, ids, mask) == [f"{ANSWERS[0]}{tagged.eos_token}", ANSWERS[1]]
