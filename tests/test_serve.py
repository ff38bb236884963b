"""The Serve endpoint against a real local cluster: a head node started with `ray start --head`, the app deployed
by `jobs.deploy` from serve/config.yaml, vLLM (CPU) engines serving the flow's registered draft by its alias."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from conftest import FLOW_REGISTRY, ROOT, free_port, run_job_here

pytestmark = pytest.mark.slow

MODEL = FLOW_REGISTRY
KEY = "s3cret-test-key"
MAX_PROMPT_TOKENS = 96
MAX_BODY = 32 * 1024
QUESTIONS = ["What is 12 plus 7?", "Sort these numbers: 5, 3, 9.", "Spell the word cat backwards."]


@pytest.fixture(scope="module")
def registered(flow, mlflow_server):
    """(tracking URI, the champion's version) of the flow's registered draft."""
    from mlflow import MlflowClient

    # Both URIs named: tests before these set the process-wide registry URI to their own stores.
    version = MlflowClient(mlflow_server, registry_uri=mlflow_server).get_model_version_by_alias(MODEL, "champion").version
    return mlflow_server, str(version)


def deploy(dashboard: str, config: Path, tracking_uri: str, *sets: str):
    """`python -m jobs.deploy` in this process (`run_job_here`: the job's `__main__` and exit path without a fresh
    interpreter's imports; it talks to the head node's dashboard over HTTP, not through this process's Ray)."""
    args = [a for s in sets for a in ("--set", s)]
    return run_job_here("jobs.deploy", "--config", str(config), "--address", dashboard, "--tracking-uri",
                        tracking_uri, "--wait", "600", *args)


@pytest.fixture(scope="module")
def endpoint(registered, head_node, tmp_path_factory):
    """The deployed endpoint on the session's head node: (base URL, the head node, config file, work folder)."""
    tracking_uri, _ = registered
    work = tmp_path_factory.mktemp("serve")
    key_file = work / "api-key"
    key_file.write_text(KEY + "\n")
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    result = deploy(head_node.dashboard, work / "config.yaml", tracking_uri, f"model_ref=models:/{MODEL}@champion",
                    "replicas=2", f"api_key_file={key_file}", f"max_prompt_tokens={MAX_PROMPT_TOKENS}",
                    f"max_body_bytes={MAX_BODY}", f"download_dir={work / 'models'}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    yield f"http://127.0.0.1:{port}", head_node, work / "config.yaml", work


def client(url: str, key: str | None = KEY) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=300)


def chat_body(question: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 24,
            "temperature": 0, **extra}


def metric_lines(url: str, name: str) -> list[str]:
    return [line for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines() if line.startswith(name)]


def stream_text(c: httpx.Client, path: str, body: dict) -> tuple[str, list[dict]]:
    events = []
    with c.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data: ")))
    text = "".join((ch.get("delta") or {}).get("content") or ch.get("text") or ""
                   for e in events for ch in e.get("choices", []))
    return text, events


def test_answers_equal_vllms_own_greedy_output(endpoint, flow):
    """Chat and completion, streamed and not, give what vLLM gave for the base alone in the export's round trip
    (speculation is lossless)."""
    from draftsmith.evaluation.evaluate import from_export

    url = endpoint[0]
    recipe, results = flow
    samples = results["export"].outputs.verification.samples
    assert len(samples) == recipe.export.verify_prompts and all(s.text for s in samples)
    max_tokens = recipe.export.verify_max_tokens
    c = client(url)
    for sample in samples:
        body = {**chat_body(""), "messages": sample.messages, "max_tokens": max_tokens}
        answer = c.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == sample.text
        streamed, events = stream_text(c, "/v1/chat/completions", body)
        assert streamed == sample.text
        assert not any(e.get("usage") for e in events)  # usage only when the client asks for it
    _, events = stream_text(c, "/v1/chat/completions",
                            chat_body(QUESTIONS[0], stream_options={"include_usage": True}))
    assert events[-1]["usage"]["completion_tokens"] > 0
    # completions: the same prompt the chat template makes, sent raw
    from transformers import AutoTokenizer

    draft = from_export(results["export"].outputs.export_dir)
    prompt = AutoTokenizer.from_pretrained(draft.base_dir).apply_chat_template(
        samples[0].messages, add_generation_prompt=True, tokenize=False)
    raw = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    done = c.post("/v1/completions", json=raw)
    assert done.status_code == 200, done.text
    assert done.json()["choices"][0]["text"] == samples[0].text
    streamed, _ = stream_text(c, "/v1/completions", raw)
    assert streamed == samples[0].text


def test_openai_client_works_unchanged(endpoint):
    from openai import OpenAI

    oc = OpenAI(base_url=f"{endpoint[0]}/v1", api_key=KEY)
    assert [m.id for m in oc.models.list().data] == [MODEL]
    out = oc.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                     max_tokens=16, temperature=0.7, top_p=0.9, n=2, seed=7, stop=["\n\n"])
    assert len(out.choices) == 2 and out.usage.completion_tokens > 0
    again = oc.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                       max_tokens=16, temperature=0.7, top_p=0.9, n=2, seed=7, stop=["\n\n"])
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]  # seeded
    chunks = list(oc.completions.create(model=MODEL, prompt="What is", max_tokens=8, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices)


def test_auth_refuses_missing_and_wrong_keys(endpoint):
    url = endpoint[0]
    for key in (None, "wrong-key"):
        refused = client(url, key).post("/v1/chat/completions", json=chat_body(QUESTIONS[0]))
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "authentication_error"
        assert KEY not in refused.text
    assert client(url, None).get("/v1/models").status_code == 401
    assert client(url).get("/v1/models").status_code == 200


@pytest.mark.parametrize("body, status, param", [
    (chat_body("hi", max_tokens=5000), 400, "max_tokens"),
    (chat_body("hi", n=9), 400, "n"),
    (chat_body("hi", temperature=-1), 400, "temperature"),
    (chat_body("hi", top_p=0), 400, "top_p"),
    (chat_body("hi", stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (chat_body("add " * 200), 400, "messages"),  # over max_prompt_tokens
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    (chat_body("hi", model="no-such-model"), 404, "model"),
])
def test_bad_requests_get_openai_errors(endpoint, body, status, param):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    answer = client(endpoint[0]).post(path, json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_oversized_and_malformed_bodies_are_refused(endpoint):
    c = client(endpoint[0])
    big = c.post("/v1/chat/completions", json=chat_body("x" * (MAX_BODY + 10)))
    assert big.status_code == 400 and big.json()["error"]["code"] == "body_too_large"
    broken = c.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"


def test_random_bodies_over_http_get_4xx_openai_errors_never_5xx(endpoint):
    """The fuzz of tests/test_bad_input.py through the real endpoint, on loopback: 60 bodies, each at most a few
    generated tokens (an accepted body gets max_tokens 4)."""
    import random

    from tests.test_bad_input import _random_body

    rng, c = random.Random(11), client(endpoint[0])
    for i in range(60):
        kind = "chat" if i % 2 else "completions"
        body = _random_body(rng, kind)
        body.setdefault("max_tokens", 4)
        answer = c.post(f"/v1/{'chat/' if kind == 'chat' else ''}completions", json=body)
        assert answer.status_code < 500, (body, answer.text)
        if answer.status_code >= 400:
            error = answer.json()["error"]
            assert error["message"] and error["type"], answer.text


def test_model_resolves_by_alias_and_reports_its_version(endpoint, registered):
    card = client(endpoint[0]).get(f"/v1/models/{MODEL}").json()
    assert card["metadata"]["serving_versions"] == [registered[1]]
    assert card["metadata"]["algorithm"] == "eagle3"
    assert client(endpoint[0]).get("/health").json()["status"] == "ok"


def test_metrics_show_acceptance_length_and_request_counts(endpoint):
    url = endpoint[0]
    c = client(url)
    for question in QUESTIONS:
        assert c.post("/v1/chat/completions", json=chat_body(question)).status_code == 200
        stream_text(c, "/v1/chat/completions", chat_body(question))
    deadline = time.time() + 30  # engines report every 2 s
    while time.time() < deadline and not metric_lines(url, "draftsmith_spec_decode_acceptance_length{"):
        time.sleep(1)
    (line,) = metric_lines(url, "draftsmith_spec_decode_acceptance_length{")
    assert 1.0 < float(line.rsplit(" ", 1)[1]) <= 4.0  # k = 3
    ok = metric_lines(url, f'draftsmith_requests_total{{model="{MODEL}",route="chat",status="200"}}')
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 6
    ttft = metric_lines(url, "draftsmith_time_to_first_token_seconds_count")
    assert ttft and float(ttft[0].rsplit(" ", 1)[1]) >= 3
    assert metric_lines(url, "draftsmith_inter_token_latency_seconds_count")
    assert metric_lines(url, f'draftsmith_request_errors_total{{model="{MODEL}",route="chat",'
                             'type="invalid_request_error"}')


def _engine_total(url: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metric_lines(url, name + "{"))


def test_client_disconnect_frees_the_engine_request(endpoint):
    """A stream asked for 1,000 tokens (the engine makes them in ~3 s here); the client leaves after the first
    event, and the engine stops generating: far fewer tokens than asked, nothing left running."""
    url = endpoint[0]
    time.sleep(3)  # engine reports settle
    before = _engine_total(url, "draftsmith_engine_generation_tokens_total")
    body = {"model": MODEL, "prompt": "Count: one two three", "max_tokens": 1000, "ignore_eos": True,
            "stream": True}
    with client(url).stream("POST", "/v1/completions", json=body) as response:
        assert next(response.iter_lines()).startswith("data: ")  # generation started; the client goes away
    time.sleep(6)  # twice what the whole request takes had it not been aborted
    generated = _engine_total(url, "draftsmith_engine_generation_tokens_total") - before
    assert generated < 500, generated
    assert _engine_total(url, "draftsmith_engine_requests_running") == 0
    assert metric_lines(url, f'draftsmith_requests_total{{model="{MODEL}",route="completions",status="499"}}')


class Traffic(threading.Thread):
    """Requests one after another, a pause between them, until stopped; records every status. The pause keeps
    the load steady (about 3 requests a second) instead of taking the CPU a replacement engine needs to start:
    unpaced, it sent about 6 a second on two cores."""

    PAUSE_S = 0.3

    def __init__(self, url: str, key: str | None):
        super().__init__(daemon=True)
        self.url, self.key, self.statuses, self.stop = url, key, [], threading.Event()
        self.failures: list[str] = []  # what each non-200 answer said, for the assertion message

    def run(self):
        c = client(self.url, self.key)
        while not self.stop.is_set():
            try:
                response = c.post("/v1/chat/completions", json=chat_body(QUESTIONS[0]))
                self.statuses.append(response.status_code)
                if response.status_code != 200:
                    self.failures.append(f"{time.strftime('%H:%M:%S')} {response.status_code} {response.text[:400]}")
            except httpx.HTTPError as exc:
                self.statuses.append(repr(exc))
                self.failures.append(f"{time.strftime('%H:%M:%S')} {exc!r}")
            self.stop.wait(self.PAUSE_S)

    def assert_all_answered(self):
        assert self.statuses, "no request was sent"
        assert not self.failures, f"{len(self.failures)} of {len(self.statuses)} requests failed: {self.failures}"


def _engine_cores(head) -> list[psutil.Process]:
    """The live vLLM EngineCore processes of this cluster's Serve replicas: descendants of the head node's process
    (no other vLLM on the machine, a test's or a user's, is ever touched). A killed core stays in the process table
    as a zombie, still named EngineCore, until its replica reaps it: not counted."""
    found = []
    for proc in psutil.Process(head.pid).children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            title = " ".join(proc.cmdline()) + proc.name()
        except psutil.NoSuchProcess:  # ZombieProcess included
            continue
        if "EngineCore" in title:
            found.append(proc)
    return found


def test_a_dead_engine_or_replica_is_replaced_and_the_endpoint_keeps_answering(endpoint):
    """Under steady load: one replica's vLLM engine process is killed, and once Serve has replaced that replica,
    the other replica's whole process (engine core and all). Every request is answered, each replica is replaced,
    and the killed replica's engine core does not outlive it."""
    url, head = endpoint[0], endpoint[1]
    cores = _engine_cores(head)
    assert len(cores) == 2, cores  # one per engine replica
    traffic = Traffic(url, KEY)
    traffic.start()
    try:
        time.sleep(2)
        gone = {cores[0].pid}
        cores[0].send_signal(signal.SIGKILL)  # the engine dies; its replica fails its health check
        _wait_for_two_new_cores(head, gone)

        survivor = next(c for c in _engine_cores(head) if c.pid == cores[1].pid)
        replica = survivor.parent()
        assert "ServeReplica" in " ".join(replica.cmdline()) + replica.name(), replica.cmdline()
        gone.add(survivor.pid)
        replica.send_signal(signal.SIGKILL)  # the whole replica dies; Serve's controller notices the actor gone
        _wait_for_two_new_cores(head, gone)
        deadline = time.time() + 60  # the orphaned engine core sees its replica go and exits
        while time.time() < deadline and not _exited(survivor):
            time.sleep(1)
        assert _exited(survivor), f"the killed replica's engine core {survivor.pid} still runs"
        time.sleep(2)
    finally:
        traffic.stop.set()
        traffic.join(timeout=300)
    traffic.assert_all_answered()


def _exited(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_for_two_new_cores(head, gone: set[int], timeout_s: float = 400) -> None:
    """Until the cluster's Serve replicas run two live engine cores again, none of them one of `gone`."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        pids = {p.pid for p in _engine_cores(head)}
        if len(pids) == 2 and not pids & gone:
            return
        time.sleep(1)
    raise AssertionError(f"no replacement engine after {timeout_s} s: {_engine_cores(head)}")


def test_redeploy_moves_the_endpoint_to_a_new_champion_without_failed_requests(endpoint, registered):
    """A new version becomes champion; jobs.deploy again (auth now off) rolls the replicas over under load."""
    from mlflow import MlflowClient

    url, head, config, work = endpoint
    tracking_uri, old_version = registered
    registry = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    old = registry.get_model_version(MODEL, old_version)
    # A logged-model source needs its model id beside it (the MLflow server checks that they match).
    logged_model = old.model_id or old.source.removeprefix("models:/")
    new = registry.create_model_version(MODEL, source=old.source, run_id=old.run_id, model_id=logged_model,
                                        description="the same export, registered again (rollover test)")
    while registry.get_model_version(MODEL, new.version).status != "READY":
        time.sleep(0.5)
    registry.set_registered_model_alias(MODEL, "champion", new.version)
    try:
        traffic = Traffic(url, KEY)
        traffic.start()
        # One replica replaces the two: a rollover all the same (every replica's arguments change), for one
        # engine start instead of two.
        result = deploy(head.dashboard, config, tracking_uri, f"model_ref=models:/{MODEL}@champion", "replicas=1",
                        "api_key_file=null", f"max_prompt_tokens={MAX_PROMPT_TOKENS}",
                        f"max_body_bytes={MAX_BODY}", f"download_dir={work / 'models'}")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        deadline = time.time() + 60
        while time.time() < deadline:
            card = client(url, None).get(f"/v1/models/{MODEL}")
            if card.status_code == 200 and card.json()["metadata"]["serving_versions"] == [str(new.version)]:
                break
            time.sleep(2)
        traffic.stop.set()
        traffic.join(timeout=300)
        assert card.json()["metadata"]["serving_versions"] == [str(new.version)]
        # requests sent with the old key still pass (auth is now off), none failed during the rollover
        traffic.assert_all_answered()
        assert client(url, None).post("/v1/chat/completions", json=chat_body(QUESTIONS[1])).status_code == 200
    finally:
        registry.set_registered_model_alias(MODEL, "champion", old_version)


def test_draftsmith_serve_reuses_the_head_node_and_asks_one_question(endpoint, tiny_base, tmp_path):
    """`draftsmith serve` (the end of `make demo`): a head node that answers is used, not started again; its one
    question goes through the OpenAI client, with the base's reference answer beside it and the acceptance length
    the endpoint measured."""
    import io

    from draftsmith.commands.serve import Question, ask, default_question, ensure_head_node
    from draftsmith.embedded.build import heldout_conversations
    from draftsmith.pipeline.summary import SUMMARY_JSON
    from draftsmith.recipe.loader import load_recipe

    url, head = endpoint[0], endpoint[1]
    assert ensure_head_node(head.dashboard) is False
    # The default question: the first held-out turn of the base the last pipeline run used (its summary names it).
    recipe = load_recipe("tiny-eagle3", [f"output_dir={tmp_path}"])
    assert default_question(recipe).reference is None  # no run yet: a general question
    recipe.run_dir().mkdir(parents=True)
    (recipe.run_dir() / SUMMARY_JSON).write_text(json.dumps({"base": {"outputs": {"model_dir": str(tiny_base)}}}))
    question = default_question(recipe)
    first = next(r["messages"] for r in heldout_conversations(tiny_base) if r["messages"][0]["role"] == "user")
    assert question == Question(first[0]["content"], first[1]["content"])

    out = io.StringIO()
    answer = ask(url, question, 24, out, api_key=KEY)
    printed = out.getvalue()
    assert answer.strip() and f"answered   {answer.strip()}" in printed
    assert "(exact match)" in printed or "(differs)" in printed
    assert float(printed.split("acceptance ")[1].split()[0]) >= 1.0  # tokens per verification step
