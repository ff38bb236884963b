"""Reading prompt datasets: both chat formats, jsonl and parquet, dedupe, and quarantine with file and line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from draftsmith.synthesis.records import read_prompt_conversations


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


OPENAI = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "old answer"}, {"role": "user", "content": "More"}]}
SHAREGPT = {"id": "sg-1", "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "x"}]}


def test_both_formats_normalise(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [OPENAI])
    b = write_jsonl(tmp_path / "b.jsonl", [SHAREGPT])
    convs, bad, read, dups = read_prompt_conversations([(a, "auto"), (b, "sharegpt")])
    assert (read, dups, bad) == (2, 0, [])
    assert convs[0].system == "Be brief." and convs[0].user_turns == ["Hi", "More"]
    assert convs[1].conversation_id == "sg-1" and convs[1].user_turns == ["Hello"] and convs[1].system is None
    assert (convs[0].source, convs[0].line) == (a, 1)


def test_parquet_and_folders(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([OPENAI, OPENAI]), folder / "part-0.parquet")
    write_jsonl(folder / "part-1.jsonl", [SHAREGPT])
    convs, bad, read, dups = read_prompt_conversations([(str(folder), "auto")])
    assert (len(convs), read, dups, bad) == (2, 3, 1, [])


def test_each_bad_kind_is_quarantined_with_its_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        OPENAI,
        "{not json",
        {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": []},
        {"messages": [{"role": "assistant", "content": "only an answer"}]},
        {"text": "no conversation"},
        {"messages": [{"role": "user", "content": "word " * 400}]},
        [1, 2],
    ])
    convs, bad, read, _ = read_prompt_conversations([(path, "auto")], max_turn_tokens=100,
                                                    count_tokens=lambda t: len(t.split()))
    assert len(convs) == 1 and read == 8
    reasons = {b.line: b.reason for b in bad}
    assert set(reasons) == {2, 3, 4, 5, 6, 7, 8}
    assert "invalid JSON" in reasons[2]
    assert "unknown role 'tool'" in reasons[3]
    assert "empty conversation" in reasons[4] and "empty conversation" in reasons[5]
    assert "no 'messages', 'conversations' or 'turns' field" in reasons[6]
    assert "over the length limit" in reasons[7]
    assert "JSON object" in reasons[8]
    assert all(b.source == path for b in bad)


def test_missing_source_says_which(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        read_prompt_conversations([(str(tmp_path / "nope.jsonl"), "auto")])
