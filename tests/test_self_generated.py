"""Prompts the base writes itself: the user-turn prefix of each published template, the filters, and the prompts
stage sampling them from the tiny base through vLLM, mixed with a file and holding some out for evaluation."""

from __future__ import annotations

import json

import pytest

from chat_templates import MODELS, tokenizer_for
from draftsmith.recipe.loader import RecipeError, load_recipe
from draftsmith.recipe.schema import SelfGeneratedSource
from draftsmith.synthesis.records import read_prompt_conversations
from gguf_writer import write_gguf
from draftsmith.synthesis.self_generated import (
    NearDuplicates,
    UserTurnTemplateError,
    normalized_words,
    rejection,
    user_turn_template,
)

# What ends a user turn in each template: a special token, or (Mistral v0.2, whose [INST] markers are plain text)
# a stop string.
USER_TURN_END = {"llama3.1": "<|eot_id|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>",
                 "chatml-smollm2": "<|im_end|>", "gemma2": "<end_of_turn>", "mistral": "[/INST]"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_published_template_gives_the_prefix_a_user_turn_continues(tiny_base, name):
    tokenizer, extra_eos = tokenizer_for(tiny_base, name)
    template = user_turn_template(tokenizer, None, extra_eos)
    question = "What is 12 plus 7?"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False)
    # The prefix is exactly what the template writes before a user's words, as tokens the engine continues.
    assert rendered.startswith(template.prefix_text + question)
    assert tokenizer.decode(template.prefix_ids) == template.prefix_text
    end = USER_TURN_END[name]
    if name == "mistral":
        assert template.stop == [end]
    else:
        assert tokenizer.convert_tokens_to_ids(end) in template.stop_token_ids and template.stop == []
    assert tokenizer.eos_token_id in template.stop_token_ids
    if MODELS[name][3]:  # takes a system turn
        assert "Answer in French." in user_turn_template(tokenizer, "Answer in French.", extra_eos).prefix_text
    else:
        with pytest.raises(UserTurnTemplateError, match="after a system turn: System role not supported"):
            user_turn_template(tokenizer, "Answer in French.", extra_eos)


def test_a_template_without_a_user_prefix_is_refused(tiny_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(UserTurnTemplateError, match="puts nothing before a user turn"):
        user_turn_template(tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(UserTurnTemplateError, match="no chat template"):
        user_turn_template(tokenizer)


def test_filters_name_what_is_wrong_with_a_sample():
    source = SelfGeneratedSource(kind="self_generated", min_chars=10, max_chars=80)

    def why(text, finish="stop", ids=(1, 2, 3)):
        return rejection(text, finish, list(ids), {99}, source)

    assert why("Can you suggest a good book on Roman history?") is None
    assert why("Can you suggest a good book?", finish="length") == "cut at max_tokens"
    assert why("Can you suggest <x> a good book?", ids=(1, 99, 2, 3)) == "holds a special token"
    assert why("Hi there") == "shorter than min_chars"
    assert why("Tell me about " + "rivers and lakes " * 10) == "longer than max_chars"
    assert why("Расскажи мне о реках России, пожалуйста") == "over max_non_ascii_share"
    assert why("the cat sat the cat sat the cat sat the cat sat") == "over max_repeated_share"
    assert why("?!?! ... !!!!") == "no words"


def test_near_duplicates_are_found_by_three_gram_overlap():
    seen = NearDuplicates(0.7)
    seen.add(normalized_words("Can you give me some tips on planning a trip to Italy this summer?"))
    assert seen.check(normalized_words("can you give me some tips on planning a trip to Italy this summer")) \
        == "duplicate"  # case and punctuation aside
    assert seen.check(normalized_words("Can you give me some tips on planning a trip to Italy this summer, please?")) \
        == "near duplicate"
    assert seen.check(normalized_words("Can you give me some tips on cooking rice?")) is None


def test_recipe_takes_self_generated_sources_and_their_heldout_set():
    recipe = load_recipe("tiny-eagle3", [
        "base.model=/models/some-chat-model",
        "data.sources=[{path: prompts.jsonl}, {kind: self_generated, num_prompts: 50, num_heldout: 10}]",
        "evaluation.prompt_sets=[{name: self-heldout}]", "evaluation.gate_set=self-heldout"])
    assert [s.kind for s in recipe.data.sources] == ["file", "self_generated"]
    assert recipe.data.heldout_prompts() == 10
    with pytest.raises(RecipeError, match="no data source holds prompts out"):
        load_recipe("tiny-eagle3", ["base.model=/models/some-chat-model", "data.sources=[{path: prompts.jsonl}]",
                                    "evaluation.prompt_sets=[{name: self-heldout}]", "evaluation.gate_set=self-heldout"])
    with pytest.raises(RecipeError, match="kind"):
        load_recipe("tiny-eagle3", ["data.sources=[{kind: magic}]"])


def test_real_model_recipe_samples_filters_and_holds_out_prompts_from_a_gguf_base(tiny_base, tmp_path,
                                                                                   monkeypatch):
    """The shipped real-model recipe's prompts stage, on the test base written as a GGUF file (SmolLM2 itself is
    an optional extra, run by `make bench`), with a user file mixed in."""
    from draftsmith import tracking
    from draftsmith.embedded.tokenizer import CHAT_TEMPLATE, EOS
    from draftsmith.stages.run import run_recipe

    monkeypatch.setenv("DRAFTSMITH_CACHE_DIR", str(tmp_path / "cache"))
    gguf = write_gguf(tiny_base, tmp_path / "tiny.gguf", eos_token=EOS, chat_template=CHAT_TEMPLATE)
    users = tmp_path / "users.jsonl"
    users.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 12 plus 7?"}]}) + "\n")
    source = "{kind: self_generated, num_prompts: 12, num_heldout: 4, max_tokens: 48, min_chars: 8}"
    recipe = load_recipe("smollm2-eagle3", [f"base.model={gguf}", f"output_dir={tmp_path}",
                                            f"data.sources=[{{path: {users}}}, {source}]"])
    assert recipe.evaluation.prompt_sets[0].path is None  # the recipe's held-out set: these prompts
    tracking.configure(recipe.tracking, tmp_path)
    result = run_recipe(recipe, until="prompts")["prompts"]
    sources = result.outputs.sources
    assert sources[0].path == users.resolve()
    stats = json.loads((result.directory / "self-generated-1.stats.json").read_text())
    assert stats["prompts"] == 12 and stats["heldout"] == 4, stats
    assert stats["sampled"] == stats["kept"] + stats["rejected"] + stats["surplus"]
    assert stats["prefix"].endswith("<|user|>")  # the embedded template's user-turn prefix

    generated, bad, _, _ = read_prompt_conversations([(str(sources[1].path), "openai")])
    heldout, bad_heldout, _, _ = read_prompt_conversations([(str(result.outputs.heldout), "openai")])
    assert not bad and not bad_heldout and len(generated) == 12 and len(heldout) == 4
    # Training and held-out prompts are distinct, and no two prompts are near-duplicates.
    seen = NearDuplicates(0.7)
    for conversation in generated + heldout:
        words = normalized_words(conversation.user_turns[0])
        assert seen.check(words) is None, conversation.user_turns[0]
        seen.add(words)
    rejected = (result.directory / "self-generated-1.rejected.jsonl").read_text().splitlines()
    assert len(rejected) == stats["rejected"]

    # A re-run of a finished stage is skipped; a crashed one reuses the sources it had written.
    again = run_recipe(recipe, until="prompts")["prompts"]
    assert again.skipped
    (again.directory / "_DONE.json").unlink()
    before = sources[1].path.read_text()
    rerun = run_recipe(recipe, until="prompts")["prompts"]
    assert not rerun.skipped and rerun.outputs.sources[1].path.read_text() == before
