"""Regenerate every assistant turn with the base model, turn by turn, in rounds over each shard.

Conversations are split into shards up front. One Ray Data pass hands the pending shards to an actor pool of
engines (`synthesis.concurrency` actors, each starting its engine once for the whole job); an actor runs a
shard's rounds (round k answers user turn k of every conversation of the shard still going, given the
regenerated turns before it, as one batch) and writes the shard's state atomically after each round, so a killed
run resumes at the last finished (shard, round) and a finished shard is never written twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer

from draftsmith.jsonl import read_jsonl, write_jsonl
from draftsmith.recipe.schema import SynthesisSettings, VllmSettings
from draftsmith.synthesis.engines import ChatEngine, EngineSpec
from draftsmith.synthesis.records import BadRecord, PromptConversation, read_prompt_conversations

log = logging.getLogger(__name__)

OUTPUT_DIR = "conversations"
STATE_DIR = "state"
QUARANTINE_DIR = "quarantine"
MANIFEST = "manifest.json"


class SynthesisError(RuntimeError):
    """Synthesis finished but its output cannot be trusted (too many bad records)."""


def _initial_state(conv: PromptConversation) -> dict[str, Any]:
    return {"conversation_id": conv.conversation_id, "user_turns": conv.user_turns,
            "messages": [{"role": "system", "content": conv.system}] if conv.system else [],
            "source": {"file": conv.source, "line": conv.line}, "turns": [], "done": False,
            "truncated": False, "error": ""}


def _seed(conversation_id: str, turn: int) -> int:
    """Per-request sampling seed: a resumed run samples exactly what the killed one would have."""
    return int.from_bytes(hashlib.sha256(f"{conversation_id}/{turn}".encode()).digest()[:4], "little") >> 1


def state_file(out_dir: Path, round_index: int, shard: int) -> Path:
    return out_dir / STATE_DIR / f"round-{round_index:02d}" / f"shard-{shard:05d}.jsonl"


class RoundRunner:
    """Runs the rounds of shards through one engine and writes their state files."""

    def __init__(self, out_dir: Path, settings: SynthesisSettings, tokenizer, engine: ChatEngine):
        self.out_dir, self.settings, self.tokenizer, self.engine = out_dir, settings, tokenizer, engine
        self.generated_tokens = 0

    def state_file(self, round_index: int, shard: int) -> Path:
        return state_file(self.out_dir, round_index, shard)

    def run_shard(self, shard: int, initial: list[dict], rounds: int) -> None:
        """Every round of one shard not finished before (an interrupted run left the earlier ones on disk)."""
        for k in range(rounds):
            if self.state_file(k, shard).is_file():
                continue
            states = read_jsonl(self.state_file(k - 1, shard)) if k > 0 else initial
            self.run_round(k, {shard: states})

    def _prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])

    def run_round(self, k: int, states: dict[int, list[dict]]) -> None:
        sampling = self.settings.sampling
        requests, waiting = [], {}
        for shard, convs in states.items():
            waiting[shard] = 0
            for index, st in enumerate(convs):
                if st["done"] or k >= len(st["user_turns"]):
                    continue
                prompt = st["messages"] + [{"role": "user", "content": st["user_turns"][k]}]
                budget = sampling.max_total_tokens - self._prompt_tokens(prompt)
                if budget <= 0:  # no room for an answer: the conversation ends at the previous turn
                    st["done"], st["truncated"] = True, True
                    continue
                max_tokens = min(sampling.max_tokens_per_turn, budget)
                requests.append({"key": f"{shard}:{index}", "messages": prompt, "max_tokens": max_tokens,
                                 "seed": _seed(st["conversation_id"], k)})
                st["_budget"] = budget
                waiting[shard] += 1
        for shard in [s for s, n in waiting.items() if n == 0]:
            self._finish_shard(k, shard, states[shard])
        if not requests:
            return
        log.info("round %d: %d requests from %d shards", k + 1, len(requests), len(states))
        size = self.settings.batch_size
        started, tokens_before = time.perf_counter(), self.generated_tokens
        for lo in range(0, len(requests), size):
            if lo:  # a line per batch: a long round shows progress in a terminal and a log file alike
                log.info("round %d: %d of %d requests answered (%.0f generated tokens/s)", k + 1, lo, len(requests),
                         (self.generated_tokens - tokens_before) / (time.perf_counter() - started))
            for result in self.engine.answer(requests[lo: lo + size]):
                shard, index = map(int, str(result["key"]).split(":"))
                self._apply(states[shard][index], k, result)
                waiting[shard] -= 1
                if waiting[shard] == 0:
                    self._finish_shard(k, shard, states[shard])
        unanswered = {s: n for s, n in waiting.items() if n > 0}
        assert not unanswered, f"the engine dropped requests of shards {unanswered}"

    def _apply(self, st: dict, k: int, result: dict) -> None:
        budget = st.pop("_budget")
        if result["error"]:
            st["done"], st["error"] = True, f"engine error on turn {k + 1}: {result['error'][:500]}"
            return
        tokens = int(result["generated_tokens"])
        self.generated_tokens += tokens
        cut_by_total_limit = budget < self.settings.sampling.max_tokens_per_turn and tokens >= budget
        if result["finish_reason"] == "length" and cut_by_total_limit:
            st["done"], st["truncated"] = True, True  # the answer did not fit: end at the previous turn
            return
        st["messages"] += [{"role": "user", "content": st["user_turns"][k]},
                           {"role": "assistant", "content": result["text"]}]
        st["turns"].append({"generated_tokens": tokens, "finish_reason": result["finish_reason"]})

    def _finish_shard(self, k: int, shard: int, convs: list[dict]) -> None:
        write_jsonl(self.state_file(k, shard), convs)


def _output_record(st: dict) -> dict:
    return {"conversation_id": st["conversation_id"], "messages": st["messages"], "source": st["source"],
            "stats": {"turns": st["turns"], "generated_tokens": sum(t["generated_tokens"] for t in st["turns"]),
                      "truncated": st["truncated"]}}


def _quarantine_reason(st: dict) -> str | None:
    if st["error"]:
        return st["error"]
    if not st["turns"]:
        return "over the length limit: not even the first turn fits synthesis.sampling.max_total_tokens"
    return None


class ShardSynthesizer:
    """Ray Data actor: its engine starts once; each row it gets is a pending shard, whose rounds it runs."""

    def __init__(self, spec: EngineSpec, out_dir: str, rounds: int):
        if not logging.getLogger().handlers:  # a Ray worker: its INFO lines (progress) reach the driver's output
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.engine = spec.build()
        self.runner = RoundRunner(Path(out_dir), spec.settings, AutoTokenizer.from_pretrained(spec.model_dir),
                                  self.engine)
        self.rounds = rounds

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        generated = []
        for shard, states in zip(batch["shard"], batch["states"], strict=True):
            before = self.runner.generated_tokens
            self.runner.run_shard(int(shard), json.loads(states), self.rounds)
            generated.append(self.runner.generated_tokens - before)
        return {"shard": [int(s) for s in batch["shard"]], "generated_tokens": generated}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def run_shards(spec: EngineSpec, out_dir: Path, shards: dict[int, list[PromptConversation]], rounds: int) -> int:
    """Every round of `shards` through `synthesis.concurrency` engine actors; returns the tokens generated."""
    import ray

    rows = [{"shard": i, "states": json.dumps([_initial_state(c) for c in convs])} for i, convs in shards.items()]
    done = ray.data.from_items(rows).map_batches(
        ShardSynthesizer, fn_constructor_kwargs={"spec": spec, "out_dir": str(out_dir), "rounds": rounds},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(spec.settings.concurrency, len(rows))),
        **spec.actor_resources())
    return sum(int(row["generated_tokens"]) for row in done.iter_rows())


def synthesize_conversations(
    sources: list[tuple[str, str]], model_dir: Path, settings: SynthesisSettings, out_dir: Path,
    max_bad_share: float, vllm: VllmSettings | None = None,
) -> dict[str, Any]:
    """Answer every conversation of `sources` with the base in `model_dir`; returns the counts.

    Output: OUT/conversations/shard-NNNNN.jsonl (OpenAI chat format with conversation_id and generation
    stats), OUT/quarantine/*.jsonl (source, line, reason) and OUT/manifest.json.
    """
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    limit = settings.sampling.max_total_tokens
    positions = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    if limit > positions:
        log.warning("synthesis.sampling.max_total_tokens=%d exceeds the base's %d positions; using %d",
                    limit, positions, positions)
        settings = settings.model_copy(deep=True)
        settings.sampling.max_total_tokens = limit = positions
    convs, bad, read, duplicates = read_prompt_conversations(
        sources, max_turn_tokens=limit, count_tokens=lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"]))
    write_jsonl(out_dir / QUARANTINE_DIR / "read.jsonl", (b.to_json() for b in bad))
    shards = [convs[i: i + settings.shard_size] for i in range(0, len(convs), settings.shard_size)]
    final = [out_dir / OUTPUT_DIR / f"shard-{i:05d}.jsonl" for i in range(len(shards))]
    pending = [i for i in range(len(shards)) if not final[i].is_file()]
    log.info("synthesis: %d records read, %d conversations (%d duplicates dropped, %d quarantined), "
             "%d of %d shards to do", read, len(convs), duplicates, len(bad), len(pending), len(shards))

    generated = None
    if pending:
        rounds = max(len(c.user_turns) for i in pending for c in shards[i])
        spec = EngineSpec(settings, model_dir, max_model_len=limit, vllm=vllm)
        generated = run_shards(spec, out_dir, {i: shards[i] for i in pending}, rounds)
        for i in pending:
            last = read_jsonl(state_file(out_dir, rounds - 1, i))
            write_jsonl(out_dir / QUARANTINE_DIR / f"shard-{i:05d}.jsonl",
                        (BadRecord(st["source"]["file"], st["source"]["line"], reason,
                                   json.dumps(st["messages"])).to_json()
                         for st in last if (reason := _quarantine_reason(st))))
            write_jsonl(final[i], (_output_record(st) for st in last if _quarantine_reason(st) is None))
    return _summarise(out_dir, final, read, duplicates, max_bad_share, generated, time.perf_counter() - started)


def _summarise(out_dir: Path, final: list[Path], read: int, duplicates: int, max_bad_share: float,
               generated: int | None, seconds: float) -> dict[str, Any]:
    """The counts (generated None: nothing was left to generate) in OUT/manifest.json; fails past max_bad_share."""
    written = sum(1 for path in final for _ in open(path))
    quarantined = sum(1 for path in (out_dir / QUARANTINE_DIR).glob("*.jsonl") for _ in open(path))
    summary = {
        "read": read, "duplicates": duplicates, "written": written, "quarantined": quarantined,
        "bad_share": quarantined / max(1, read), "generated_tokens": generated or 0,
        "tokens_per_s": generated / seconds if generated is not None else 0.0, "seconds": seconds,
        "shards": [str(p) for p in final], "output_dir": str(out_dir / OUTPUT_DIR),
    }
    (out_dir / MANIFEST).write_text(json.dumps(summary, indent=2))
    if summary["bad_share"] > max_bad_share:
        raise SynthesisError(
            f"{quarantined} of {read} records ({summary['bad_share']:.1%}) were quarantined, over "
            f"data.max_bad_share={max_bad_share:.1%}; see {out_dir / QUARANTINE_DIR} for each source, line and "
            "reason, fix the data or raise the threshold")
    return summary
