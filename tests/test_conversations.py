"""The conversation generator and the tokenizer: deterministic, correct references, held-out kept out."""

from __future__ import annotations

import re

import pytest

from draftsmith.embedded.conversations import (
    Conversation,
    FAMILIES,
    FOLLOWUP,
    conversation_key,
    generate_conversations,
    train_and_heldout,
)
from draftsmith.embedded.packing import IGNORE_INDEX, pack_conversations, tokenize_conversation
from draftsmith.embedded.tokenizer import train_tokenizer, conversation_texts


def test_generation_is_seeded():
    a = [c.to_record() for c in generate_conversations(50, seed=3)]
    b = [c.to_record() for c in generate_conversations(50, seed=3)]
    c = [c.to_record() for c in generate_conversations(50, seed=4)]
    assert a == b
    assert a != c


def test_every_family_and_followups_appear():
    convs = generate_conversations(200, seed=0)
    assert {c.family for c in convs} == set(FAMILIES)
    assert any(t.kind == FOLLOWUP for c in convs for t in c.turns)
    assert any(c.system for c in convs if c.family == "facts")


def test_reference_answers_are_right():
    for conv in generate_conversations(300, seed=1):
        first = conv.turns[0]
        if conv.family == "arithmetic":
            a, b = map(int, re.findall(r"\d+", first.user))
            assert first.assistant.endswith(f"= {a + b}.")
        elif conv.family == "sorting":
            xs = [int(x) for x in re.findall(r"\d+", first.user)]
            assert first.assistant == f"Sorted: {', '.join(map(str, sorted(xs)))}."
        elif conv.family == "spelling":
            word = re.search(r'"(\w+)"', first.user).group(1)
            assert "".join(first.assistant.split(" ")[-1].rstrip(".").split("-")) == word
        elif conv.family == "units":
            n = int(re.search(r"\d+", first.user).group())
            factor = int(re.search(r"is (\d+) ", first.assistant).group(1))
            assert first.assistant.endswith(f"= {n * factor} {first.user.split()[-1].rstrip('.')}.")


def test_records_round_trip():
    for conv in generate_conversations(30, seed=9):
        assert Conversation.from_record(conv.to_record()) == conv


def test_heldout_prompts_stay_out_of_training():
    train, heldout = train_and_heldout(3000, 100, seed=0)
    train_keys = {conversation_key(c) for c in train}
    leaked = [c for c in heldout if conversation_key(c) in train_keys and c.family != "spelling"]
    assert not leaked


def test_unknown_family_lists_valid_ones():
    with pytest.raises(ValueError, match="arithmetic"):
        generate_conversations(3, seed=0, families=("poetry",))


@pytest.fixture(scope="module")
def tokenizer():
    convs = generate_conversations(600, seed=0)
    return train_tokenizer(conversation_texts(c.messages() for c in convs), vocab_size=512)


def test_tokenizer_round_trips_and_keeps_digits_single(tokenizer):
    text = "Add the ones: 7 + 8 = 15, write 5 carry 1."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert all(len(t.lstrip("Ġ")) <= 1 for t in tokens if any(ch.isdigit() for ch in t))


def test_assistant_mask_covers_answers_and_eos(tokenizer):
    conv = generate_conversations(1, seed=5)[0]
    ids, mask = tokenize_conversation(tokenizer, conv.messages())
    answer_ids = [i for i, m in zip(ids, mask, strict=True) if m]
    expected = "".join(t.assistant + tokenizer.eos_token for t in conv.turns)
    assert tokenizer.decode(answer_ids) == expected
    assert ids[0] == tokenizer.bos_token_id


def test_chat_template_rejects_unknown_roles(tokenizer):
    with pytest.raises(Exception, match="unknown role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_packing_keeps_whole_conversations(tokenizer):
    convs = [c.messages() for c in generate_conversations(40, seed=2)]
    rows = pack_conversations(tokenizer, convs, seq_len=256)
    n_assistant = sum(sum(tokenize_conversation(tokenizer, c)[1]) for c in convs)
    assert int((rows["labels"] != IGNORE_INDEX).sum()) == n_assistant
    assert rows["input_ids"].shape[1] == 256
    # positions restart at 0 for every packed conversation
    assert int((rows["position_ids"] == 0).sum()) >= len(convs)
    with pytest.raises(ValueError, match="seq_len"):
        pack_conversations(tokenizer, convs, seq_len=8)
