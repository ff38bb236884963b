"""Read prompt datasets (OpenAI chat, ShareGPT or MT-bench `turns`; jsonl or parquet), normalise them, quarantine bad records."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant"}
OPENAI_ROLES = ("system", "user", "assistant")
SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class PromptConversation:
    """What synthesis needs of a conversation: its user turns (assistant turns are regenerated)."""

    conversation_id: str
    user_turns: list[str]
    system: str | None
    source: str
    line: int
    content_key: str = field(default="")


@dataclass
class BadRecord:
    source: str
    line: int
    reason: str
    record: str

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "line": self.line, "reason": self.reason, "record": self.record[:2000]}


def source_files(path: str | Path) -> list[Path]:
    """A file, or the jsonl/parquet files of a folder in name order."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
        if not files:
            raise FileNotFoundError(f"data source {path} holds no {'/'.join(SUFFIXES)} files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"data source {path} does not exist; fix data.sources in the recipe")
    return [path]


def check_source(path: str | Path, key: str) -> None:
    """Before anything starts: `path` (recipe key `key`) is a file or a folder of data files, none of them empty.
    Bad records inside are quarantined later; a missing or empty file is a mistake in the recipe."""
    try:
        files = source_files(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{key}: {exc}") from None
    for file in files:
        if file.stat().st_size == 0:
            raise FileNotFoundError(f"{key}: {file} is empty; point at a file with records, or remove it")


def raw_records(path: Path) -> Iterator[tuple[int, Any, str]]:
    """(1-based line or row number, parsed record or None, raw text) for each record of a file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row, json.dumps(row, default=str)
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                yield i, json.loads(text), text
            except json.JSONDecodeError as exc:
                yield i, None, f"{text.strip()}\x00invalid JSON: {exc.msg} at column {exc.colno}"


def normalize_messages(record: dict, fmt: str) -> list[dict[str, str]]:
    """Normalised [{role, content}] of a record; raises ValueError with the reason when it is unusable."""
    if fmt in ("auto", "mtbench") and "turns" in record and not ("messages" in record or "conversations" in record):
        # MT-bench style: the user turns alone, each asked after the model's answer to the previous one.
        turns = record["turns"]
        if not isinstance(turns, list) or not turns:
            raise ValueError("empty conversation: 'turns' is not a non-empty list")
        if any(not isinstance(t, str) for t in turns):
            raise ValueError("a turn in 'turns' is not text")
        return [{"role": "user", "content": t} for t in turns]
    if fmt in ("auto", "openai") and "messages" in record:
        raw, role_key, content_key, roles = record["messages"], "role", "content", {r: r for r in OPENAI_ROLES}
    elif fmt in ("auto", "sharegpt") and "conversations" in record:
        raw, role_key, content_key, roles = record["conversations"], "from", "value", SHAREGPT_ROLES
    else:
        expected = {"auto": "'messages', 'conversations' or 'turns'", "openai": "'messages'",
                    "sharegpt": "'conversations'", "mtbench": "'turns'"}
        raise ValueError(f"no {expected[fmt]} field (format {fmt})")
    if not isinstance(raw, list) or not raw:
        raise ValueError("empty conversation")
    messages = []
    for turn in raw:
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise ValueError(f"a turn lacks '{role_key}' or '{content_key}'")
        role = roles.get(str(turn[role_key]).lower())
        if role is None:
            raise ValueError(f"unknown role {turn[role_key]!r}; expected one of {sorted(set(roles))}")
        content = turn[content_key]
        if not isinstance(content, str):
            raise ValueError(f"{role} content is {type(content).__name__}, not text")
        messages.append({"role": role, "content": content})
    return messages


def content_key(system: str | None, user_turns: list[str]) -> str:
    """Identity of a prompt conversation by content: duplicates share it."""
    blob = json.dumps([system or "", *user_turns], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def parse_record(record: Any, fmt: str, source: str, line: int) -> PromptConversation:
    if not isinstance(record, dict):
        raise ValueError(f"a record is a JSON object, got {type(record).__name__}")
    messages = normalize_messages(record, fmt)
    system = None
    if messages[0]["role"] == "system":
        system = messages.pop(0)["content"]
    if any(m["role"] == "system" for m in messages):
        raise ValueError("a system message after the first turn")
    user_turns = [m["content"] for m in messages if m["role"] == "user"]
    if not user_turns or any(not t.strip() for t in user_turns):
        raise ValueError("empty conversation: no user turn with text")
    key = content_key(system, user_turns)
    cid = str(record.get("conversation_id") or record.get("id") or record.get("question_id") or key)
    return PromptConversation(cid, user_turns, system, source, line, key)


def read_prompt_conversations(
    sources: list[tuple[str, str]], max_turn_tokens: int | None = None, count_tokens=None,
) -> tuple[list[PromptConversation], list[BadRecord], int, int]:
    """Every source's usable conversations in source order, deduplicated by content.

    Returns (conversations, quarantined records, records read, duplicates dropped). A user turn longer than
    `max_turn_tokens` (counted by `count_tokens`) is quarantined: no answer to it could fit the length limit.
    """
    conversations: list[PromptConversation] = []
    bad: list[BadRecord] = []
    seen: set[str] = set()
    ids: set[str] = set()
    read = duplicates = 0
    for path_text, fmt in sources:
        for path in source_files(path_text):
            for line, record, raw in raw_records(path):
                read += 1
                if record is None:
                    text, _, reason = raw.partition("\x00")
                    bad.append(BadRecord(str(path), line, reason, text))
                    continue
                try:
                    conv = parse_record(record, fmt, str(path), line)
                    if max_turn_tokens is not None and count_tokens is not None:
                        longest = max(count_tokens(t) for t in conv.user_turns)
                        if longest > max_turn_tokens:
                            raise ValueError(f"a user turn of {longest} tokens is over the length limit "
                                             f"({max_turn_tokens}, synthesis.sampling.max_total_tokens)")
                except ValueError as exc:
                    bad.append(BadRecord(str(path), line, str(exc), raw.strip()))
                    continue
                if conv.content_key in seen:
                    duplicates += 1
                    continue
                seen.add(conv.content_key)
                if conv.conversation_id in ids:  # a reused id on different content: keep both, apart
                    conv.conversation_id = f"{conv.conversation_id}-{conv.content_key[:8]}"
                ids.add(conv.conversation_id)
                conversations.append(conv)
    return conversations, bad, read, duplicates
