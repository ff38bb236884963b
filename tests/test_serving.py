"""The serving library without a cluster: limits, API keys, stream accounting, metrics, config rendering, and
the TensorRT-LLM deployment driven by a named fake of TensorRT-LLM's LLM API (it cannot be installed here)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from draftsmith.recipe.schema import ServingSettings
from draftsmith.serving.auth import load_api_key
from draftsmith.serving.deploy import DeployError, render
from draftsmith.serving.errors import APIError
from draftsmith.serving.limits import check_prompt_tokens, check_request, parse_body
from draftsmith.serving.metrics import ServeMetrics
from draftsmith.serving.model_source import ModelSourceError, RegistryRef
from draftsmith.serving.retry import retry_attempts
from draftsmith.serving.stream import StreamAccount

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ServingSettings(model_ref="models:/m@champion", max_tokens_limit=64, max_n=2, max_prompt_tokens=10,
                           max_body_bytes=100)
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("extra, param", [
    ({"max_tokens": 65}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "8"}, "max_tokens"),
    ({"max_completion_tokens": 100}, "max_completion_tokens"), ({"n": 3}, "n"), ({"temperature": 2.5}, "temperature"),
    ({"temperature": True}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"stop": ["a"] * 5}, "stop"), ({"stop": [1]}, "stop"), ({"seed": 1.5}, "seed"), ({"stream": "yes"}, "stream"),
])
def test_out_of_range_values_name_their_field(extra, param):
    with pytest.raises(APIError) as info:
        check_request({**CHAT, **extra}, "chat", SETTINGS)
    assert info.value.status == 400 and info.value.param == param
    assert info.value.body()["error"]["type"] == "invalid_request_error"


def test_in_range_requests_pass_and_get_a_bounded_max_tokens():
    assert check_request(dict(CHAT), "chat", SETTINGS)["max_tokens"] == 64
    body = check_request({**CHAT, "max_tokens": 8, "n": 2, "temperature": 0, "top_p": 1, "stop": "x", "seed": 3},
                         "chat", SETTINGS)
    assert body["max_tokens"] == 8
    with pytest.raises(APIError, match="prompt"):
        check_request({"prompt": ""}, "completions", SETTINGS)
    with pytest.raises(APIError) as info:
        check_prompt_tokens(11, SETTINGS)
    assert info.value.code == "context_length_exceeded"


def test_body_limits_and_json_errors():
    with pytest.raises(APIError) as info:
        parse_body(b"x" * 101, SETTINGS)
    assert info.value.code == "body_too_large"
    for raw in (b"{oops", b"[1, 2]"):
        with pytest.raises(APIError) as info:
            parse_body(raw, SETTINGS)
        assert info.value.code == "invalid_json"


def test_api_key_from_file_or_env_and_never_printed(tmp_path, monkeypatch):
    monkeypatch.delenv("DRAFTSMITH_API_KEY", raising=False)
    assert not load_api_key(ServingSettings()).required
    monkeypatch.setenv("DRAFTSMITH_API_KEY", "from-env")
    key = load_api_key(ServingSettings())
    key.check("Bearer from-env")
    for header in (None, "Basic from-env", "Bearer nope", "Bearer "):
        with pytest.raises(APIError) as info:
            key.check(header)
        assert info.value.status == 401 and "from-env" not in info.value.message
    assert "from-env" not in repr(key)
    secret = tmp_path / "key"
    secret.write_text("from-file\n")
    load_api_key(ServingSettings(api_key_file=str(secret))).check("Bearer from-file")
    with pytest.raises(FileNotFoundError, match="api_key_file"):
        load_api_key(ServingSettings(api_key_file=str(tmp_path / "missing")))


def test_registry_references_parse_or_say_what_is_expected():
    assert RegistryRef.parse("models:/draft@champion") == RegistryRef("draft", alias="champion")
    assert RegistryRef.parse("models:/draft/3") == RegistryRef("draft", version="3")
    for bad in ("models:/draft", "models:/@x", "models:/draft/latest"):
        with pytest.raises(ModelSourceError, match="models:/NAME@ALIAS"):
            RegistryRef.parse(bad)


def _event(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def test_stream_accounting_counts_usage_and_strips_it_unless_asked():
    chunks = [[_event({"choices": [{"index": 0, "delta": {"content": "Hel"}}]})],
              _event({"choices": [{"index": 0, "delta": {"content": "lo"}}]}),
              _event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}), "data: [DONE]\n\n"]
    quiet, asked = StreamAccount(0.0, False), StreamAccount(0.0, True)
    sent_quiet = "".join(quiet.relay(c) for c in chunks)
    sent_asked = "".join(asked.relay(c) for c in chunks)
    assert '"usage"' not in sent_quiet and '"usage"' in sent_asked
    assert quiet.usage == asked.usage == {"prompt_tokens": 3, "completion_tokens": 2}
    assert quiet.done and quiet.ttft is not None and quiet.last_token >= quiet.ttft


def test_metrics_render_request_counts_and_acceptance_from_engine_reports():
    metrics = ServeMetrics()
    metrics.record_success("m", "chat", seconds=0.5, ttft=0.1, prompt_tokens=4, completion_tokens=11,
                           streamed_until_last=0.3)
    metrics.record_error("m", "chat", 400, "invalid_request_error")
    spec = {"num_drafts": 10, "num_draft_tokens": 30, "num_accepted_tokens": 20,
            "num_accepted_tokens_per_pos": [9, 7, 4]}
    reports = {"r1": {"model": "m", "model_version": "2", "spec_decode": spec, "requests_running": 1},
               "r2": {"model": "m", "model_version": "2", "spec_decode": {**spec, "num_accepted_tokens": 10,
                                                                          "num_accepted_tokens_per_pos": [6, 3, 1]}}}
    text = metrics.render(reports).decode()
    assert 'draftsmith_spec_decode_acceptance_length{model="m",model_version="2"} 2.5' in text  # 1 + 30/20
    assert 'draftsmith_spec_decode_acceptance_rate{model="m",position="1"} 0.75' in text
    assert 'draftsmith_requests_total{model="m",route="chat",status="400"} 1.0' in text
    assert 'draftsmith_inter_token_latency_seconds_count{model="m"} 1.0' in text
    assert 'draftsmith_engine_requests_running{model="m",replica="r1"} 1.0' in text


def test_serve_config_renders_with_overrides_and_validated_args(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text("{}")
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    rendered = render(config, [f"model_ref={export}", "replicas=3", "autoscaling.max_replicas=4"])
    args = rendered["applications"][0]["args"]
    assert args["model_ref"] == str(export) and args["replicas"] == 3 and args["autoscaling"]["max_replicas"] == 4
    ServingSettings.model_validate(args)
    with pytest.raises(DeployError, match="replica_cpu"):
        render(config, [f"model_ref={export}", "replica_cpu=2"])  # a typo is refused, naming the key
    with pytest.raises(DeployError, match="KEY=VALUE"):
        render(config, ["replicas"])


# ------------------------------------------------------------------ TensorRT-LLM deployment, with a fake API
@dataclass
class FakeCompletion:
    index: int
    text: str = ""
    token_ids: list = field(default_factory=list)
    finish_reason: str | None = None


class FakeRequestOutput:
    """The part of TensorRT-LLM's RequestOutput the deployment uses (a named fake, not TensorRT-LLM)."""

    def __init__(self, words: list[str], n: int):
        self.words, self.n, self.finished, self.aborted = words, n, False, False
        self.outputs = [FakeCompletion(i) for i in range(n)]

    def _advance(self, step: int):
        for o in self.outputs:
            o.text = "".join(self.words[: step + 1])
            o.token_ids = list(range(step + 1))
            o.finish_reason = "length" if step == len(self.words) - 1 else None
        self.finished = step == len(self.words) - 1

    def __aiter__(self):
        async def steps():
            for step in range(len(self.words)):
                self._advance(step)
                yield self
        return steps()

    async def aresult(self):
        self._advance(len(self.words) - 1)
        return self

    def abort(self):
        self.aborted = True


class FakeTensorRTLLM:
    """Stands in for `tensorrt_llm.LLM` on machines without TensorRT-LLM; records what it was given."""

    def __init__(self, kwargs):
        self.kwargs, self.requests, self.outputs = kwargs, [], []

    def generate_async(self, prompt, sampling_params, streaming):
        self.requests.append((prompt, sampling_params, streaming))
        self.outputs.append(FakeRequestOutput([" four", " plus", " four"], sampling_params["n"]))
        return self.outputs[-1]

    async def get_stats_async(self, timeout):
        yield {"specDecodingStats": {"numDraftTokens": 9, "numAcceptedTokens": 6, "numRequestsWithDraftTokens": 3}}


@pytest.mark.slow
def test_trtllm_deployment_speaks_openai_over_the_llm_api(flow):
    from serve.trtllm_server import TRTLLMServer

    export_dir = flow[1]["export"].outputs.export_dir
    settings = ServingSettings(engine="trtllm", model_ref=str(export_dir), num_speculative_tokens=2)

    async def scenario():
        server = TRTLLMServer.__new__(TRTLLMServer)  # Serve awaits the async constructor the same way
        await server.__init__(serving=settings.model_dump(), llm_factory=FakeTensorRTLLM, sampling_params_cls=dict)
        llm = server.llm
        assert llm.kwargs["speculative_config"]["decoding_type"] == "Eagle"
        assert llm.kwargs["speculative_config"]["max_draft_len"] == 2
        assert Path(llm.kwargs["speculative_config"]["speculative_model_dir"]).is_dir()
        assert Path(llm.kwargs["model"], "config.json").is_file() and llm.kwargs["enable_iter_perf_stats"]
        assert llm.kwargs["trust_remote_code"] is False  # only serving.trust_remote_code turns it on
        request = {"messages": [{"role": "user", "content": "What is 4 plus 4?"}], "max_tokens": 3, "n": 2,
                   "temperature": 0.5, "seed": 1}
        (answer,) = [item async for item in server.chat(request)]
        assert [c["message"]["content"] for c in answer["choices"]] == [" four plus four"] * 2
        assert answer["usage"]["completion_tokens"] == 6
        assert llm.requests[0][1] == {"max_tokens": 3, "n": 2, "temperature": 0.5, "seed": 1}
        assert llm.requests[0][0] == server.tokenizer.apply_chat_template(
            request["messages"], add_generation_prompt=True, tokenize=True, return_dict=False)
        events = "".join([item async for item in server.completions(
            {"prompt": "x", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}})])
        payloads = [json.loads(e[6:]) for e in events.split("\n\n") if e.startswith("data: {")]
        assert "".join(c["text"] for p in payloads for c in p["choices"]) == " four plus four"
        assert payloads[-1]["usage"]["completion_tokens"] == 3 and events.endswith("data: [DONE]\n\n")
        stream = server.chat({**request, "stream": True})
        await stream.__anext__()
        await stream.aclose()  # the client went away
        assert llm.outputs[-1].aborted and not llm.outputs[0].aborted
        stats = await server.engine_stats()
        assert stats["spec_decode"]["acceptance_length"] == 3.0  # 1 + 6 / 3
        assert (await server.admit("completions", {"prompt": "What is 4 plus 4?"}))["prompt_tokens"] > 0
        refused = await server.admit("completions", {"max_tokens": 3})  # no prompt: a 400 naming it, as JSON
        assert refused["status"] == 400 and refused["error"]["param"] == "prompt", refused

    asyncio.run(scenario())


def test_engine_retries_back_off_within_their_time_budget():
    now = [0.0]

    async def sleep(seconds):
        now[0] += seconds

    async def attempts(budget):
        found = []
        async for attempt in retry_attempts(budget, clock=lambda: now[0], sleep=sleep):
            found.append((attempt, now[0]))
        return found

    assert asyncio.run(attempts(0)) == [(0, 0.0)]
    now[0] = 0.0
    # 1, 2, 4, then every 4 s; the attempt a further pause would push past the budget is the last.
    assert asyncio.run(attempts(20)) == [(0, 0.0), (1, 1.0), (2, 3.0), (3, 7.0), (4, 11.0), (5, 15.0), (6, 19.0)]


def test_the_ingress_and_the_board_import_no_engine():
    """The ingress forwards JSON: importing it (and the stats board) loads neither vLLM nor Ray Serve LLM, so its
    replicas start in seconds and a cluster with TensorRT-LLM alone can run it."""
    import subprocess
    import sys

    code = ("import sys, serve.ingress, serve.stats_board; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'vllm', 'tensorrt_llm'}), "
            "'ray.llm' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["[]", "False"], result.stdout
