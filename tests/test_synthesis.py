"""Synthesis end to end on the tiny base: real Ray Data, real vLLM (CPU), a real HTTP endpoint, kill and resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from openai_test_server import OpenAITestServer
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TINY_BASE_OVERRIDES, job_running, kill_submitted_job, submit_job
from draftsmith.embedded.build import heldout_conversations
from draftsmith.embedded.exact_match import TurnPrompt, greedy_answers
from draftsmith.recipe.loader import load_recipe
from draftsmith.synthesis.synthesize import SynthesisError, synthesize_conversations

pytestmark = pytest.mark.slow


def _two_turn_prompts(base: Path, count: int) -> list[dict]:
    """Held-out conversations of the base cut to their first two turns (user, assistant, user, assistant)."""
    out = []
    for record in heldout_conversations(base):
        msgs = [m for m in record["messages"] if m["role"] != "system"]
        if len(msgs) >= 4:
            out.append({"conversation_id": record["conversation_id"], "messages": msgs[:4]})
    assert len(out) >= count, "the tiny base's held-out set has too few multi-turn conversations"
    return out[:count]


def _outputs(out_dir: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((out_dir / "conversations").glob("shard-*.jsonl"))
            for line in path.read_text().splitlines()]


def test_openai_engine_regenerates_turn_by_turn_and_quarantines(tiny_base, local_ray, tmp_path, monkeypatch):
    server = OpenAITestServer(tiny_base, api_key="test-key")
    monkeypatch.setenv("TEST_OPENAI_KEY", "test-key")
    try:
        good = _two_turn_prompts(tiny_base, 4)
        lines = [json.dumps(c) for c in good] + [
            json.dumps({"messages": [{"role": "user", "content": "FLAKY: spell the word \"apple\"."}]}),
            json.dumps({"messages": [{"role": "user", "content": "FAIL500 please"}]}),
            "{broken json",
        ]
        data = tmp_path / "prompts.jsonl"
        data.write_text("\n".join(lines) + "\n")
        recipe = load_recipe("tiny-eagle3", [
            "synthesis.engine=openai", f"synthesis.openai.base_url={server.url}",
            "synthesis.openai.api_key_env=TEST_OPENAI_KEY", "synthesis.openai.max_retries=2",
            "synthesis.shard_size=3", "synthesis.sampling.max_tokens_per_turn=24"])
        out = tmp_path / "out"
        summary = synthesize_conversations([(str(data), "openai")], tiny_base, recipe.synthesis, out,
                                           max_bad_share=0.5)
        assert (summary["read"], summary["written"], summary["quarantined"]) == (7, 5, 2)

        outputs = {o["conversation_id"]: o for o in _outputs(out)}
        assert len(outputs) == 5
        for conv in good:
            result = outputs[conv["conversation_id"]]
            assert [m["content"] for m in result["messages"] if m["role"] == "user"] == \
                [m["content"] for m in conv["messages"] if m["role"] == "user"]
            assert [m["role"] for m in result["messages"]] == ["user", "assistant", "user", "assistant"]
            assert len(result["stats"]["turns"]) == 2 and result["stats"]["generated_tokens"] > 0
            # The request for turn 2 carried the regenerated turn 1, not the dataset's original answer.
            assert {"messages": result["messages"][:3]}["messages"] in [r["messages"] for r in server.requests]
            assert result["messages"][3]["content"] == server.complete(result["messages"][:3], 24)[0]

        quarantined = [json.loads(line) for path in sorted((out / "quarantine").glob("*.jsonl"))
                       for line in path.read_text().splitlines()]
        reasons = {q["line"]: q["reason"] for q in quarantined}
        assert "HTTP 500" in reasons[6] and "invalid JSON" in reasons[7]
        assert all(q["source"] == str(data) for q in quarantined)
        assert sum(1 for r in server.requests if "FLAKY" in r["messages"][-1]["content"]) == 2  # retried once

        # A stricter threshold fails the run, after writing everything, and points at the quarantine.
        with pytest.raises(SynthesisError, match="quarantine"):
            synthesize_conversations([(str(data), "openai")], tiny_base, recipe.synthesis, out, max_bad_share=0.1)
        assert json.loads((out / "manifest.json").read_text())["written"] == 5
    finally:
        server.close()


def test_vllm_synthesis_resumes_after_a_kill_without_duplicates_or_losses(tiny_base, head_node, tmp_path):
    """A synthesis job submitted with `ray job submit` is killed once its first shard is written; the same job
    submitted again keeps that shard and writes every other conversation once."""
    conversations = _two_turn_prompts(tiny_base, 12)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    out_root = tmp_path / "runs"
    overrides = [*TINY_BASE_OVERRIDES, f"output_dir={out_root}", f"data.sources=[{{path: {data}}}]",
                 "synthesis.shard_size=2", "synthesis.batch_size=2", "synthesis.sampling.max_tokens_per_turn=24"]
    args = ["--recipe", "tiny-eagle3", "--until", "synthesize", *[a for o in overrides for a in ("--set", o)]]

    job = f"synthesis-drill-{time.time_ns()}"
    submitted = submit_job(head_node, "jobs.pipeline", *args, wait=False, submission_id=job)
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            if list(out_root.glob("tiny-eagle3/synthesize-*/state/round-00/shard-*.jsonl")):
                break
            assert job_running(head_node, job), "synthesis finished or died before it was killed"
            time.sleep(0.2)
    finally:
        assert kill_submitted_job(head_node, "jobs.pipeline") == 1, "synthesis finished before it was killed"
    kept = {p: p.stat().st_mtime_ns for p in out_root.glob("tiny-eagle3/synthesize-*/state/round-00/*.jsonl")}
    assert kept

    second = submit_job(head_node, "jobs.pipeline", *args)
    assert second.returncode == 0 and "succeeded" in second.stdout, second.stdout[-3000:] + second.stderr[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished work was not redone

    out_dir = next(out_root.glob("tiny-eagle3/synthesize-*"))
    outputs = _outputs(out_dir)
    ids = [o["conversation_id"] for o in outputs]
    assert sorted(ids) == sorted(c["conversation_id"] for c in conversations)  # each exactly once
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert (manifest["read"], manifest["written"], manifest["quarantined"]) == (12, 12, 0)

    # One MLflow run for the stage (the killed attempt's, continued and finished), with the counts and a sample.
    client = MlflowClient(f"sqlite:///{out_root.resolve() / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("draftsmith").experiment_id,
                              "tags.`draftsmith.stage` = 'synthesize'")
    assert [r.info.status for r in runs] == ["FINISHED"], [(r.info.run_id, r.info.status) for r in runs]
    assert runs[0].data.metrics["written"] == 12 and runs[0].data.metrics["quarantined"] == 0
    assert "sample_conversations.json" in [a.path for a in client.list_artifacts(runs[0].info.run_id)]

    # Each turn is the base's own greedy answer to the regenerated history before it: transformers, run on those
    # prefixes, gives the same turns (a reference without a second vLLM start).
    sample = outputs[:4]
    prompts = [o["messages"][:1] for o in sample] + [o["messages"][:3] for o in sample]
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    direct = greedy_answers(model, tokenizer, [TurnPrompt(p, "", "") for p in prompts], max_new_tokens=24,
                            batch_size=1)
    expected = [o["messages"][1]["content"] for o in sample] + [o["messages"][3]["content"] for o in sample]
    agree = sum(text == e for (text, _), e in zip(direct, expected, strict=True))
    assert agree >= len(expected) - 1, (direct, expected)  # fp32 both ways; allow one near-tie


def test_long_conversations_end_at_a_turn_boundary(tiny_base, local_ray, tmp_path):
    server = OpenAITestServer(tiny_base)
    try:
        long_turn = "Sort these numbers in ascending order: " + ", ".join(str(i) for i in range(40, 61)) + "."
        data = tmp_path / "prompts.jsonl"
        data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in [
            [{"role": "user", "content": "What is 12 + 34?"}, {"role": "assistant", "content": "x"},
             {"role": "user", "content": long_turn}],
            [{"role": "system", "content": long_turn}, {"role": "user", "content": long_turn}],
        ]))
        recipe = load_recipe("tiny-eagle3", ["synthesis.engine=openai", f"synthesis.openai.base_url={server.url}",
                                             "synthesis.sampling.max_total_tokens=120",
                                             "synthesis.sampling.max_tokens_per_turn=24"])
        out = tmp_path / "out"
        summary = synthesize_conversations([(str(data), "openai")], tiny_base, recipe.synthesis, out,
                                           max_bad_share=1.0)
        assert (summary["written"], summary["quarantined"]) == (1, 1)
        [kept] = _outputs(out)
        assert kept["stats"]["truncated"] and len(kept["stats"]["turns"]) == 1
        assert [m["role"] for m in kept["messages"]] == ["user", "assistant"]
        [dropped] = [json.loads(line) for line in (out / "quarantine" / "shard-00000.jsonl").read_text().splitlines()]
        assert "over the length limit" in dropped["reason"] and dropped["line"] == 2
    finally:
        server.close()
