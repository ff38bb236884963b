"""Evaluation through vLLM (CPU) and the promotion gate; prompt files with malformed records; the vLLM CPU kernel
fix that makes sampled speculative decoding accept anything at all."""

from __future__ import annotations

import functools
import json
from importlib.metadata import entry_points

import pytest
import torch
from mlflow import MlflowClient

from conftest import DATA_OVERRIDES, FLOW, run_job_here
from draftsmith.engines import vllm_cpu
from draftsmith.engines.vllm_args import engine_args
from draftsmith.engines.vllm_cpu import expand_batch_values, fix_cpu_expand_kernel
from draftsmith.evaluation.gate import decide, engine_dtype
from draftsmith.evaluation.measure import BASE, DRAFT, summarize
from draftsmith.evaluation.prompt_sets import PromptSetError, load_prompt_set
from draftsmith.export.bundle import export_bundle
from draftsmith.recipe.loader import RecipeError, load_recipe
from draftsmith.recipe.schema import ExportSettings, PromptSet, VllmSettings
from draftsmith.registry.register import register_export

K = 3


# ------------------------------------------------------------------------------------------------- fast
def test_cpu_expand_kernel_fix_matches_the_triton_semantics():
    """x=[a, b, c], cu=[2, 5, 6] -> [a, a, b, b, b, c], with replace_from mapped to replace_to."""
    temperatures = torch.tensor([0.7, 0.0, 1.3])
    out = torch.full((6,), float("nan"))
    expand_batch_values(out, temperatures, torch.tensor([2, 5, 6], dtype=torch.int32), 0.0, 1.0)
    assert out.tolist() == pytest.approx([0.7, 0.7, 1.0, 1.0, 1.0, 1.3])
    top_k = torch.tensor([5, 0], dtype=torch.int32)
    out_k = torch.full((4,), -7, dtype=torch.int32)
    expand_batch_values(out_k, top_k, torch.tensor([1, 4]), 0, 0)
    assert out_k.tolist() == [5, 0, 0, 0]


def test_cpu_expand_kernel_fix_is_a_vllm_plugin():
    from vllm.utils import cpu_triton_utils

    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("draftsmith_cpu_kernels") == "draftsmith.engines.vllm_cpu:fix_cpu_expand_kernel"
    fix_cpu_expand_kernel()
    assert cpu_triton_utils._expand_kernel_impl is expand_batch_values


def test_engine_dtype_is_bfloat16_only_on_cpus_that_compute_it(monkeypatch):
    monkeypatch.setattr(vllm_cpu, "cpu_has_bf16", lambda: True)
    assert engine_args(VllmSettings(), "cpu")["dtype"] == "bfloat16"
    assert engine_args(VllmSettings(dtype="float32"), "cpu")["dtype"] == "float32"
    monkeypatch.setattr(vllm_cpu, "cpu_has_bf16", lambda: False)
    assert engine_args(VllmSettings(), "cpu")["dtype"] == "float32"
    assert "dtype" not in engine_args(VllmSettings(), "gpu")  # the model's own dtype
    assert engine_args(VllmSettings(dtype="bfloat16"), "gpu")["dtype"] == "bfloat16"
    # The embedded recipe pins float32 everywhere: its greedy references are float32.
    recipe = load_recipe("tiny-eagle3")
    assert recipe.vllm.dtype == recipe.serving.vllm.dtype == "float32"


def test_cpu_engines_compute_on_every_core(monkeypatch):
    import torch

    from draftsmith.engines.vllm_args import engine_env

    # vLLM reserves a core for its scheduler on x86 (half of a 2-core machine): none unless the environment asks.
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    assert engine_env(VllmSettings()) == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert engine_env(VllmSettings(in_process=True))["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    assert engine_env(None)["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
    # A Ray actor starts with OMP_NUM_THREADS=1 (its num_cpus); its engine takes its share of the cores.
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(vllm_cpu.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    try:
        assert vllm_cpu.use_cores() == 4 and torch.get_num_threads() == 4
        assert vllm_cpu.use_cores(engines_sharing=2) == 2 and vllm_cpu.os.environ["OMP_NUM_THREADS"] == "2"
        assert vllm_cpu.use_cores(engines_sharing=8) == 1
        # The environment alone leaves torch's count in this thread as it was; compute_threads sets it, even after
        # vLLM's CPU worker has made torch.set_num_threads a no-op.
        torch.set_num_threads(1)
        assert vllm_cpu.share_of_cores(engines_sharing=2) == 2 and vllm_cpu.os.environ["OMP_NUM_THREADS"] == "2"
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
        vllm_cpu.compute_threads(3)
        assert torch.get_num_threads() == 3
    finally:
        torch._C.set_num_threads(threads)


def test_long_generation_relays_vllm_progress_lines(tmp_path, monkeypatch, caplog):
    from draftsmith.engines import vllm_offline

    log = tmp_path / "vllm.log"
    line = ("(pid=1) INFO [loggers.py:335] Engine 000: Avg prompt throughput: 250.0 tokens/s, Avg generation "
            "throughput: 490.0 tokens/s, Running: 250 reqs, Waiting: 488 reqs")

    class Child:  # alive for three waits, writing one progress line per wait
        waits = 0

        def is_alive(self):
            return self.waits < 3

        def join(self, timeout):
            self.waits += 1
            log.write_text("loading\n" + line.replace("488", str(500 - self.waits)) + "\n")

    monkeypatch.setattr(vllm_offline, "PROGRESS_EVERY_S", 0.01)
    with caplog.at_level("INFO", logger="draftsmith.engines.vllm_offline"):
        vllm_offline.relay_progress(Child(), log, timeout_s=60)
    relayed = [r.getMessage() for r in caplog.records]
    assert relayed == [f"vLLM: Avg prompt throughput: 250.0 tokens/s, Avg generation throughput: 490.0 tokens/s, "
                       f"Running: 250 reqs, Waiting: {n} reqs" for n in (499, 498)], relayed


def test_self_generated_prompts_are_never_prefilled_in_chunks():
    from draftsmith.synthesis.self_generated import unchunked_prefill

    # Every sequence a step may schedule fits its token budget (vllm-cpu fails seeded chunked prefills).
    args = unchunked_prefill(24)
    assert args["max_num_batched_tokens"] >= args["max_num_seqs"] * 24
    assert unchunked_prefill(2)["max_num_batched_tokens"] == 4096  # never below vLLM's CPU default


def test_malformed_prompt_records_are_quarantined_line_by_line(tmp_path):
    good = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}]},
        {"conversations": [{"from": "human", "value": "Spell the word \"cat\"."}]},
        {"question_id": 81, "category": "writing", "turns": ["Sort: 3, 1, 2.", "Now reverse that list."]},
    ]
    bad = ['{"messages": [{"role": "user", "content": "unterminated', '{"prompt": "no conversation field"}',
           '{"messages": [{"role": "wizard", "content": "hi"}]}', '{"turns": []}', '{"turns": ["ok", 7]}']
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join([json.dumps(good[0]), bad[0], json.dumps(good[1]), *bad[1:], json.dumps(good[2])])
                    + "\n")
    loaded = load_prompt_set(PromptSet(name="mixed", path=str(path)), None, tmp_path / "quarantine", 1.0)
    assert [c.user_turns for c in loaded.conversations] == [
        ["What is 2 + 2?", "And 3 + 3?"], ["Spell the word \"cat\"."], ["Sort: 3, 1, 2.", "Now reverse that list."]]
    assert loaded.conversations[0].as_request()["messages"][0] == {"role": "system", "content": "Be brief."}
    assert loaded.conversations[2].as_request()["followups"] == ["Now reverse that list."]
    assert (loaded.read, loaded.quarantined) == (8, 5)
    quarantined = [json.loads(line) for line in open(loaded.quarantine_file)]
    assert [q["line"] for q in quarantined] == [2, 4, 5, 6, 7]
    reasons = " | ".join(q["reason"] for q in quarantined)
    for expected in ("invalid JSON", "no 'messages', 'conversations' or 'turns' field", "unknown role 'wizard'",
                     "'turns' is not a non-empty list", "not text"):
        assert expected in reasons, reasons
    with pytest.raises(PromptSetError, match=r"prompts\.jsonl.*5 of 8 records are malformed.*line 2: invalid JSON"):
        load_prompt_set(PromptSet(name="mixed", path=str(path)), None, tmp_path / "q2", 0.05)
    with pytest.raises(PromptSetError, match="does not exist"):
        load_prompt_set(PromptSet(name="gone", path=str(tmp_path / "missing.jsonl")), None, tmp_path, 0.05)


def test_recipe_refuses_inconsistent_evaluation_settings():
    with pytest.raises(RecipeError, match="repeat"):
        load_recipe("tiny-eagle3", ["evaluation.prompt_sets=[{name: a}, {name: a}]", "evaluation.gate_set=a"])
    with pytest.raises(RecipeError, match="gate_set='nope' is not one of"):
        load_recipe("tiny-eagle3", ["evaluation.gate_set=nope"])


def _result(tokens: list[list[int]], seconds: float, accepted: int | None = None, drafts: int = 0):
    spec = None if accepted is None else {"num_drafts": drafts, "num_draft_tokens": drafts * K,
                                          "num_accepted_tokens": accepted, "num_accepted_tokens_per_pos": [5, 3, 1],
                                          "acceptance_length": 1 + accepted / drafts}
    n = sum(len(t) for t in tokens)
    return {"conversations": [{"turns": [{"token_ids": t}]} for t in tokens], "seconds": seconds, "output_tokens": n,
            "output_tokens_per_s": n / seconds, "ttft_s": [0.01], "tpot_s": [0.002, 0.004], "spec_decode": spec}


def test_summary_ratios_and_greedy_equality():
    runs = [{"name": "s@t=0", "set": "s", "temperature": 0.0, "conversations": [{}, {}]}]
    results = {BASE: {"s@t=0": _result([[1, 2, 3], [4, 5]], 1.0)},
               DRAFT: {"s@t=0": _result([[1, 2, 3], [4, 6]], 0.5, accepted=9, drafts=6)}}
    row = summarize(results, runs, K)[0]
    assert row[DRAFT]["acceptance_length"] == pytest.approx(2.5)
    assert row[DRAFT]["acceptance_rate_per_position"] == pytest.approx([5 / 6, 3 / 6, 1 / 6])
    assert row[DRAFT]["speedup_vs_base"] == pytest.approx(2.0) and row[DRAFT]["tpot_ms"] == pytest.approx(3.0)
    assert row[DRAFT]["greedy_identical"] is False and row[DRAFT]["greedy_mismatched"] == [1]


def test_gate_decisions():
    new = {"acceptance_length": 2.5, "greedy_identical": True, "greedy_mismatched": []}
    assert decide(new, None, None, 0.0) == (True, "no champion yet")
    promote, reason = decide(new, {"acceptance_length": 2.4}, "3", 0.2)
    assert not promote and "2.500 < champion v3's 2.400 + margin 0.2" in reason
    assert decide(new, {"acceptance_length": 2.4}, "3", 0.1)[0]
    promote, reason = decide({**new, "greedy_identical": False, "greedy_mismatched": [2]}, None, None, 0.0)
    assert not promote and "differs" in reason and "[2]" in reason
    # In bf16 a near-tie flips a greedy token whatever the draft: reported, not refused (float32 refuses, above).
    promote, reason = decide({**new, "greedy_identical": False, "greedy_mismatched": [2]}, None, None, 0.0,
                             exact_numerics=False)
    assert promote and reason.startswith("no champion yet; greedy output") and "[2]" in reason
    promote, reason = decide({**new, "greedy_identical": False, "greedy_mismatched": [2], "speedup_vs_base": 0.9},
                             None, None, 0.0, {"ngram": {"speedup_vs_base": 1.3, "acceptance_length": 2.8,
                                                         "speculative_config": {"method": "ngram"}}},
                             exact_numerics=False)
    assert not promote and "free baseline is faster" in reason and "reduced-precision" in reason
    assert engine_dtype("gpu", VllmSettings()) == "bfloat16" and engine_dtype("cpu", VllmSettings(dtype="float32")) \
        == "float32"

    # A free baseline that is faster refuses even the first version, and says what to serve instead.
    ngram = {"speedup_vs_base": 1.3, "acceptance_length": 2.8,
             "speculative_config": {"method": "ngram", "num_speculative_tokens": 3}}
    promote, reason = decide({**new, "speedup_vs_base": 0.9}, None, None, 0.0, {"ngram": ngram})
    assert not promote and "speedup 0.900x over the base < ngram's 1.300x" in reason and "'method': 'ngram'" in reason
    assert decide({**new, "speedup_vs_base": 1.4}, None, None, 0.0, {"ngram": ngram}) == (True, "no champion yet")
    promote, reason = decide({**new, "speedup_vs_base": 1.4}, {"acceptance_length": 2.6}, "3", 0.0, {"ngram": ngram})
    assert not promote and "champion v3" in reason  # beating the baseline is necessary, not sufficient


def test_recipe_gate_baselines():
    assert load_recipe("tiny-eagle3").evaluation.gate_baselines == []  # the toy base: see the recipe
    assert load_recipe("llama3.1-8b-eagle3").evaluation.gate_baselines == ["ngram"]  # the default
    with pytest.raises(RecipeError, match="gate_baselines"):
        load_recipe("tiny-eagle3", ["evaluation.gate_baselines=[suffix]"])


# ------------------------------------------------------------------------------------------------- slow
def _printed_json(stdout: str) -> dict:
    return json.JSONDecoder().raw_decode(stdout[stdout.index("{\n"):])[0]


@pytest.mark.slow
def test_evaluation_reports_acceptance_speed_and_equality(flow):
    _, results = flow
    report = json.loads((results["evaluate"].directory / "evaluation.json").read_text())
    assert report["prompt_sets"]["embedded-heldout"]["conversations"] == 3
    assert report["prompt_sets"]["embedded-mtbench"]["user_turns"] > 2  # multi-turn, asked turn by turn
    rows = {(r["set"], r["temperature"]): r for r in report["rows"]}
    assert set(rows) == {(s, t) for s in ("embedded-heldout", "embedded-mtbench") for t in (0.0, 0.7)}
    for (name, temperature), row in rows.items():
        draft = row["draft"]
        assert 1.0 <= draft["acceptance_length"] <= K + 1, (name, temperature, draft)
        assert len(draft["acceptance_rate_per_position"]) == K
        assert all(row[c]["output_tokens_per_s"] > 0 for c in ("base", "draft", "ngram"))
        assert row["ngram"]["acceptance_length"] is None or 1.0 <= row["ngram"]["acceptance_length"] <= K + 1
        if temperature == 0:
            assert draft["greedy_identical"] and row["ngram"]["greedy_identical"], (name, draft)
    # Sampling accepts draft tokens too (without the CPU kernel fix vLLM accepted none at temperature > 0).
    assert rows[("embedded-heldout", 0.7)]["draft"]["num_accepted"] > 0
    run_id = results["evaluate"].mlflow_run_id
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert 1.0 <= metrics["eval/embedded-heldout/t0/draft/acceptance_length"] <= K + 1
    artifacts = {a.path for a in MlflowClient().list_artifacts(run_id, "evaluation/plots")}
    assert {"evaluation/plots/acceptance_length.png", "evaluation/plots/acceptance_per_position.png",
            "evaluation/plots/tokens_per_s.png"} <= artifacts
    assert "| embedded-mtbench | 0.0 |" in (results["evaluate"].directory / "evaluation.md").read_text()


@pytest.mark.slow
def test_evaluate_job_takes_a_registered_version_by_alias(flow, mlflow_server, tmp_path):
    _, results = flow
    bad = tmp_path / "user-prompts.jsonl"  # a user file: two usable MT-bench records and one broken line
    bad.write_text('{"turns": ["What is 12 + 30?", "Is that more than 100?"]}\n{"turns": \n'
                   '{"turns": ["Spell the word \\"lamp\\"."]}\n')
    sets = f"evaluation.prompt_sets=[{{name: embedded-heldout, limit: 2}}, {{name: user, path: {bad}}}]"
    job = run_job_here("jobs.evaluate", "--recipe", "tiny-eagle3", *[a for o in [*DATA_OVERRIDES, *FLOW] for a in
                                                                 ("--set", o)],
                  "--set", sets, "--set", "evaluation.max_bad_share=0.5", "--set", "evaluation.temperatures=[0]",
                  "--set", "evaluation.ngram_baseline=false", "--set", f"tracking.uri={mlflow_server}",
                  "--set", f"output_dir={tmp_path}", "--model", "models:/tiny-draft-under-test@champion",
                  "--out", str(tmp_path / "report"))
    assert job.returncode == 0, job.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    assert report["registry_version"] == {"name": "tiny-draft-under-test",
                                          "version": results["register"].outputs.version}
    assert report["prompt_sets"]["user"]["conversations"] == 2 and report["prompt_sets"]["user"]["quarantined"] == 1
    quarantined = json.loads((tmp_path / "report" / "quarantine" / "user.jsonl").read_text())
    assert quarantined["line"] == 2 and "invalid JSON" in quarantined["reason"]
    assert all(r["draft"]["greedy_identical"] for r in report["rows"])
    assert "| user | 0.0 | 2 |" in job.stdout


@pytest.mark.slow
def test_gate_promotes_a_better_draft_and_refuses_a_worse_one(flow, mlflow_server, tmp_path):
    """The flow's untrained draft (the convert stage's checkpoint, exported) is champion of an empty name; the
    flow's trained draft, registered after it, beats it and is promoted by the gate job; the untrained one, gated
    again, is refused."""
    _, results = flow
    name = "tiny-gate-under-test"  # not the flow's registry name, whose tests expect one version
    base = results["base"].outputs
    untrained = tmp_path / "untrained-export"
    export_bundle(checkpoint=results["convert"].outputs.draft_dir, base_dir=base.model_dir,
                  base_hash=base.model_hash, quantized_base_dir=None, settings=ExportSettings(),
                  out_dir=untrained)
    register = functools.partial(register_export, name=name, base_dir=base.model_dir, tags={},
                                 recipe_file=results["register"].directory / "recipe.yaml", num_speculative_tokens=K)
    weak = register(export_dir=untrained, alias="champion")["version"]
    strong_version = register(export_dir=results["export"].directory / "export")["version"]
    job_args = ["--recipe", "tiny-eagle3", *[a for o in [*DATA_OVERRIDES, *FLOW] for a in ("--set", o)],
                "--set", f"tracking.uri={mlflow_server}", "--set", f"tracking.registry_name={name}",
                "--set", f"output_dir={tmp_path}"]
    promoted = run_job_here("jobs.register", *job_args, "--gate", strong_version)
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    decision = _printed_json(promoted.stdout)
    assert decision["promoted"] and decision["champion_version"] == weak, decision
    assert decision["new"]["acceptance_length"] > decision["champion"]["acceptance_length"]
    client = MlflowClient()
    assert client.get_model_version_by_alias(name, "champion").version == strong_version

    refused = run_job_here("jobs.register", *job_args, "--gate", weak)
    assert refused.returncode == 0, refused.stderr[-3000:]
    decision = _printed_json(refused.stdout)
    assert not decision["promoted"] and decision["alias"] == "challenger", decision
    assert f"< champion v{strong_version}'s" in decision["reason"]
    assert client.get_model_version_by_alias(name, "champion").version == strong_version
    assert client.get_model_version_by_alias(name, "challenger").version == weak
    assert client.get_model_version(name, weak).tags["draftsmith.gate"] == "refused"


    # With the free baseline in the gate (the default outside the toy recipe), the untrained draft also loses to
    # n-gram lookup, which needs no training: refused for that, and the decision names n-gram's config.
    against_ngram = run_job_here("jobs.register", *job_args, "--set", "evaluation.gate_baselines=[ngram]",
                                 "--gate", weak)
    assert against_ngram.returncode == 0, against_ngram.stderr[-3000:]
    decision = _printed_json(against_ngram.stdout)
    ngram = decision["baselines"]["ngram"]
    assert ngram["greedy_identical"] and ngram["speedup_vs_base"] > decision["new"]["speedup_vs_base"], decision
    assert not decision["promoted"] and "ngram's" in decision["reason"], decision
    assert decision["recommended_speculative_config"]["method"] == "ngram"
