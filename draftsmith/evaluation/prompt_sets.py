"""Evaluation prompt sets: the embedded base's held-out conversations or a user's jsonl/parquet file.

A user file may hold OpenAI `messages`, ShareGPT `conversations` or MT-bench `turns`; only the user turns are
kept (the model under test writes every answer itself, turn by turn). Records that cannot be used are written to
a quarantine file with their line and reason and counted; more than `max_bad_share` of them fails the set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from draftsmith.jsonl import write_jsonl
from draftsmith.recipe.schema import PromptSet
from draftsmith.synthesis.records import read_prompt_conversations

log = logging.getLogger(__name__)


class PromptSetError(ValueError):
    """A prompt set cannot be used (missing file, too many malformed records); the message names the file."""


@dataclass
class EvalConversation:
    conversation_id: str
    system: str | None
    user_turns: list[str]

    def as_request(self) -> dict[str, Any]:
        """The engine's form: the opening messages, then the later user turns asked one by one."""
        opening = ([{"role": "system", "content": self.system}] if self.system else []) + \
            [{"role": "user", "content": self.user_turns[0]}]
        return {"messages": opening, "followups": self.user_turns[1:]}


@dataclass
class LoadedPromptSet:
    name: str
    source: str
    conversations: list[EvalConversation]
    read: int
    quarantined: int
    duplicates: int
    quarantine_file: str | None

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "conversations": len(self.conversations), "records_read": self.read,
                "quarantined": self.quarantined, "duplicates": self.duplicates,
                "quarantine_file": self.quarantine_file,
                "user_turns": sum(len(c.user_turns) for c in self.conversations)}


def load_prompt_set(prompt_set: PromptSet, heldout_file: str | Path | None, quarantine_dir: Path,
                    max_bad_share: float, limit: int | None = None) -> LoadedPromptSet:
    """Read one set (the first `limit`, else the set's own limit, of its usable conversations)."""
    if prompt_set.path is None:
        if heldout_file is None:
            raise PromptSetError(f"prompt set {prompt_set.name!r} has no path and there are no embedded held-out "
                                 "prompts (they exist only for the embedded base); give the set a path")
        path, fmt = str(heldout_file), "openai"
    else:
        path, fmt = str(Path(prompt_set.path).expanduser()), prompt_set.format
    try:
        conversations, bad, read, duplicates = read_prompt_conversations([(path, fmt)])
    except FileNotFoundError as exc:
        raise PromptSetError(f"evaluation.prompt_sets[{prompt_set.name}]: {exc}") from None
    quarantine_file = None
    if bad:
        quarantine_file = str(write_jsonl(quarantine_dir / f"{prompt_set.name}.jsonl", (b.to_json() for b in bad)))
        log.warning("prompt set %s: %d of %d records quarantined to %s (first: %s line %d: %s)", prompt_set.name,
                    len(bad), read, quarantine_file, bad[0].source, bad[0].line, bad[0].reason)
    if read and len(bad) / read > max_bad_share:
        raise PromptSetError(
            f"prompt set {prompt_set.name!r} ({path}): {len(bad)} of {read} records are malformed, over "
            f"evaluation.max_bad_share={max_bad_share}; first: line {bad[0].line}: {bad[0].reason}. The records "
            f"and reasons are in {quarantine_file}")
    if not conversations:
        raise PromptSetError(f"prompt set {prompt_set.name!r} ({path}) has no usable conversation")
    limit = limit or prompt_set.limit
    chosen = [EvalConversation(c.conversation_id, c.system, c.user_turns) for c in conversations[:limit]]
    return LoadedPromptSet(prompt_set.name, path, chosen, read, len(bad), duplicates, quarantine_file)
