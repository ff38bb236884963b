"""Bad input at the door: each kind (recipe and overrides, base folder, data files, synthesis endpoint, Serve config,
registry, request) fails with one line naming the file, line or key, before Ray or an engine starts; and random
request bodies get a 4xx with an OpenAI error body, never a 5xx."""

from __future__ import annotations

import json
import os
import random
import struct

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from draftsmith.base_model import BaseModelError, validate_causal_lm_folder
from draftsmith.recipe.loader import RecipeError, load_recipe
from draftsmith.recipe.schema import ServingSettings
from draftsmith.serving.deploy import DeployError, load_serve_config, render
from draftsmith.serving.errors import APIError
from draftsmith.serving.limits import ACCEPTED, admit, check_request, parse_body
from draftsmith.serving.model_source import ModelSourceError, pin
from draftsmith.stages.prompts import PromptsStage
from draftsmith.stages.synthesize import SynthesizeStage
from draftsmith.synthesis.synthesize import SynthesisError
from tests.conftest import ROOT

RECIPE = ROOT / "platform" / "recipes" / "tiny-eagle3.yaml"
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b]\n"


# ------------------------------------------------------------------------------------------ recipe, overrides
def test_recipe_inputs_that_used_to_be_accepted_silently(tmp_path):
    with pytest.raises(RecipeError, match="recipe file 'configs/tiny-eagle3.yaml' does not exist"):
        load_recipe("configs/tiny-eagle3.yaml")  # not quietly the bundled recipe of that name
    for name in ("../outside", "/etc", "a/b"):
        with pytest.raises(RecipeError, match=r"key 'name'.*should match pattern"):
            load_recipe("tiny-eagle3", [f"name={name}"])
    with pytest.raises(RecipeError, match=r"--set training.steps=true: key 'training.steps'.*YAML boolean"):
        load_recipe("tiny-eagle3", ["training.steps=true"])  # not one step
    text = RECIPE.read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(text + "\ntraining:\n  steps: 5\n")
    with pytest.raises(RecipeError, match=r"twice.yaml:\d+: key 'training' appears twice \(lines \d+ and \d+\)"):
        load_recipe(twice)
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(text + "\n" + BOMB.replace("a:", "x_a:").replace("b:", "x_b:").replace("c:", "x_c:"))
    with pytest.raises(RecipeError, match=r"bomb.yaml:\d+: alias \*a stands for a list or mapping"):
        load_recipe(bomb)
    huge = tmp_path / "huge.yaml"
    huge.write_text(text + "\n#" + "x" * (1 << 20))
    with pytest.raises(RecipeError, match="more than the 1,048,576 a YAML input may have"):
        load_recipe(huge)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ntraining: [1,\n")
    with pytest.raises(RecipeError, match=r"broken.yaml:\d+: .*not valid YAML|not valid YAML: .*broken.yaml:\d+"):
        load_recipe(broken)
    # What stays accepted: booleans where booleans belong, an alias of a scalar.
    assert load_recipe("tiny-eagle3", ["training.use_gpu=false"]).training.use_gpu is False


# ------------------------------------------------------------------------------------------------ base folder
def _base(folder, config: dict | None = None):
    folder.mkdir()
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, architectures=["LlamaForCausalLM"]).to_dict()
    (folder / "config.json").write_text(json.dumps(config if config is not None else cfg))
    (folder / "tokenizer_config.json").write_text("{}")
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(3, dtype=torch.bfloat16)}, str(folder / "model.safetensors"))
    return folder


def test_base_folders_whose_weights_or_config_are_not_a_causal_lm(tmp_path):
    good = _base(tmp_path / "good")
    assert validate_causal_lm_folder(good) == good
    weights = (good / "model.safetensors").read_bytes()
    header = struct.unpack("<Q", weights[:8])[0]
    cases = {"zero": (b"", "too short"), "random": (os.urandom(4096), "header length"),
             "header": (weights[:8] + b"\xff" * header + weights[8 + header:], "header is not JSON"),
             "truncated": (weights[:-6], "outside the file|cover"),
             "padded": (weights + b"\0" * 16, "cover")}
    for name, (content, reason) in cases.items():
        folder = _base(tmp_path / name)
        (folder / "model.safetensors").write_bytes(content)
        with pytest.raises(BaseModelError, match=f"model.safetensors is not a safetensors file .*({reason})"):
            validate_causal_lm_folder(folder)
    bert = _base(tmp_path / "bert", {"model_type": "bert"})
    with pytest.raises(BaseModelError, match="lists no `architectures`"):
        validate_causal_lm_folder(bert)  # BERT's model_type maps to BertLMHeadModel: not enough to be a causal LM


# -------------------------------------------------------------------------------------- data and the endpoint
def test_missing_or_empty_data_and_an_unreachable_endpoint_fail_before_anything_starts(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "folder").mkdir()
    (tmp_path / "ok.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    for path, message in [(tmp_path / "nowhere.jsonl", r"data.sources\[0\].path: data source .* does not exist"),
                          (tmp_path / "empty.jsonl", r"data.sources\[0\].path: .*empty.jsonl is empty"),
                          (tmp_path / "folder", r"data.sources\[0\].path: data source .* holds no")]:
        recipe = load_recipe("tiny-eagle3", [f"data.sources=[{{path: {path}}}]"])
        with pytest.raises(FileNotFoundError, match=message):
            PromptsStage().preflight(recipe)
    recipe = load_recipe("tiny-eagle3", [f"data.sources=[{{path: {tmp_path / 'ok.jsonl'}}}]",
                                         f"evaluation.prompt_sets=[{{name: s, path: {tmp_path / 'gone.jsonl'}}}]",
                                         "evaluation.gate_set=s"])
    with pytest.raises(FileNotFoundError, match=r"evaluation.prompt_sets\[s\].path"):
        PromptsStage().preflight(recipe)
    recipe = load_recipe("tiny-eagle3", ["synthesis.engine=openai", "synthesis.openai.base_url=http://127.0.0.1:9/v1",
                                         "synthesis.openai.model=m"])
    with pytest.raises(SynthesisError, match="base_url=http://127.0.0.1:9/v1 is unreachable"):
        SynthesizeStage().preflight(recipe)  # not hundreds of "bad records" later


# --------------------------------------------------------------------------------- Serve config and registry
def test_serve_configs_that_are_broken_or_hostile_and_an_unreachable_registry(tmp_path, monkeypatch):
    for name, text, message in [("syntax", "applications: [\n", r"syntax.yaml:\d+"),
                                ("bomb", BOMB + "applications: []\n", r"alias \*a stands for a list"),
                                ("twice", "applications: []\napplications: []\n", "appears twice")]:
        (tmp_path / f"{name}.yaml").write_text(text)
        with pytest.raises(DeployError, match=message):
            load_serve_config(tmp_path / f"{name}.yaml")
    config = load_serve_config(ROOT / "serve" / "config.yaml")
    with pytest.raises(DeployError, match="override 'replicas=\\[1,': .*not valid YAML|not valid YAML"):
        render(config, ["model_ref=models:/m@champion", "replicas=[1,"])
    import mlflow.tracking._tracking_service.utils as tracking_utils

    # pin() points MLflow at the registry (globally, and in the environment): put both back afterwards.
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset")  # so that the next line records what to put back
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ModelSourceError, match="registry cannot be reached.*127.0.0.1:9 is unreachable"):
        pin(ServingSettings(model_ref="models:/m@champion", tracking_uri="http://127.0.0.1:9"))


# -------------------------------------------------------------------------------------------------- requests
SETTINGS = ServingSettings(model_ref="models:/m@champion", max_tokens_limit=64, max_n=4, max_prompt_tokens=256)
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("kind, body, param", [
    ("completions", {"prompt": ["x"] * 150_000}, "prompt"),  # 150,000 completions in one request
    ("completions", {"prompt": ["x", "y"], "n": 3}, "prompt"),
    ("chat", {**CHAT, "min_tokens": 65}, "min_tokens"),
    ("chat", {**CHAT, "max_tokens": 8, "min_tokens": 9}, "min_tokens"),
    ("chat", {**CHAT, "prompt_logprobs": -1}, "prompt_logprobs"),  # vLLM: every vocabulary entry, per token
    ("chat", {**CHAT, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {**CHAT, "logprobs": 5}, "logprobs"),
    ("completions", {"prompt": "x", "logprobs": 100}, "logprobs"),
    ("chat", {**CHAT, "guided_json": {"type": "object"}}, "guided_json"),  # not passed through unchecked
    ("chat", {**CHAT, "logits_processors": ["os.system"]}, "logits_processors"),
    ("chat", {**CHAT, "stream_options": {"include_usage": True, "x": 1}}, "stream_options"),
    ("chat", {**CHAT, "frequency_penalty": 3}, "frequency_penalty"),
])
def test_request_fields_past_their_limits_are_refused_by_name(kind, body, param):
    with pytest.raises(APIError) as info:
        check_request(body, kind, SETTINGS)
    assert info.value.status == 400 and info.value.param == param, info.value.body()


def _random_value(rng: random.Random, depth: int = 0):
    choices = [lambda: None, lambda: rng.choice([True, False]), lambda: rng.randint(-(2**70), 2**70),
               lambda: rng.randint(-3, 300), lambda: rng.uniform(-5, 5), lambda: "".join(
                   rng.choice("ab {}%<>\u00e9\u2603\0") for _ in range(rng.randint(0, 12)))]
    if depth < 3:
        choices += [lambda: [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))],
                    lambda: {rng.choice(["role", "content", "name", "include_usage", "x"]): _random_value(rng, depth + 1)
                             for _ in range(rng.randint(0, 3))}]
    return rng.choice(choices)()


def _random_body(rng: random.Random, kind: str) -> dict:
    keys = sorted(ACCEPTED[kind]) + ["best_of", "guided_regex", "tools", "extra"]
    body = {key: _random_value(rng) for key in rng.sample(keys, rng.randint(0, 6))}
    if rng.random() < 0.7:  # mostly well-formed prompts, so the checks past the first one are reached too
        if kind == "chat":
            body["messages"] = [{"role": rng.choice(["user", "assistant", "system", "tool", "x"]),
                                 "content": _random_value(rng) if rng.random() < 0.3 else "hi"}
                                for _ in range(rng.randint(1, 3))]
        else:
            body["prompt"] = rng.choice(["hi", ["a", "b"], [1, 2, 3], [], [[1], [2]]])
    return body


def test_random_request_bodies_get_a_4xx_with_an_openai_error_never_a_5xx(tiny_base):
    """What a request meets before it generates, on 400 random bodies: the ingress's parse and limits, then the
    vLLM replica's `admit` (vLLM's request type, the tokenization). Each is accepted or refused with a 4xx
    OpenAI error body."""
    from transformers import AutoTokenizer

    from serve.vllm_server import REQUEST_TYPES

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    rng, outcomes = random.Random(7), {"accepted": 0, "refused": 0}
    for i in range(400):
        kind = "chat" if i % 2 else "completions"
        raw = json.dumps(_random_body(rng, kind)).encode() if i % 25 else os.urandom(rng.randint(0, 64))
        try:
            body = check_request(parse_body(raw, SETTINGS), kind, SETTINGS)
        except APIError as error:
            refusal = {"status": error.status, **error.body()}
        else:
            refusal = admit(tokenizer, kind, body, REQUEST_TYPES[kind], "m")
            if "prompt_tokens" in refusal:
                outcomes["accepted"] += 1
                continue
        assert 400 <= refusal["status"] < 500, (raw, refusal)
        assert set(refusal["error"]) >= {"message", "type", "param", "code"}
        outcomes["refused"] += 1
    assert outcomes["accepted"] > 20 and outcomes["refused"] > 200, outcomes  # both paths were exercised


# ----------------------------------------------------------------------------------------------------- trust
class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this ran",))


def test_trust_boundaries_refuse_code_from_files_configs_and_shared_folders(tmp_path, monkeypatch):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from draftsmith.serving import model_source
    from draftsmith.training.safe_resume import UnsafeCheckpoint, deepspeed_weights_only

    # Resuming: DeepSpeed's loader unpickles anything; under draftsmith it takes tensors and its own three types.
    torch.save({"w": torch.ones(2), "loss_scaler": LossScaler(1.0)}, tmp_path / "ok.pt")
    torch.save({"w": _RunsCode()}, tmp_path / "evil.pt")
    with deepspeed_weights_only():
        assert torch.equal(TorchCheckpointEngine().load(str(tmp_path / "ok.pt"))["w"], torch.ones(2))
        with pytest.raises(UnsafeCheckpoint, match="evil.pt holds posix.system"):
            TorchCheckpointEngine().load(str(tmp_path / "evil.pt"))
    # Remote code only by the explicit setting; engine args that import code by name never.
    with pytest.raises(ValueError, match="set serving.trust_remote_code: true"):
        ServingSettings(model_ref="m", engine_kwargs={"trust_remote_code": True})
    with pytest.raises(ValueError, match=r"\['worker_extension_cls'\] load code by name"):
        ServingSettings(model_ref="m", engine_kwargs={"worker_extension_cls": "evil.Ext", "enforce_eager": True})
    assert ServingSettings(model_ref="m", engine_kwargs={"enforce_eager": True}).trust_remote_code is False
    # Downloads: a folder others can write is refused; a download whose files changed is fetched again.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ModelSourceError, match="is not private to this user"):
        model_source.download_root(ServingSettings(model_ref="m", download_dir=str(shared)))
    monkeypatch.setattr(model_source.tempfile, "gettempdir", lambda: str(tmp_path))
    root = model_source.download_root(ServingSettings(model_ref="m"))
    assert root.parent == tmp_path and (root.stat().st_mode & 0o777) == 0o700
    target, marker = root / "m-v1", root / ".m-v1.complete"
    (target / "export").mkdir(parents=True)
    (target / "export" / "draft.safetensors").write_bytes(b"weights")
    marker.write_text(json.dumps({"files": model_source.tree_digests(target)}))
    assert model_source._verified_download(target, marker)
    (target / "export" / "draft.safetensors").write_bytes(b"swapped")
    assert not model_source._verified_download(target, marker)
    marker.write_text(str(target / "export"))  # a marker from before digests: not trusted either
    assert not model_source._verified_download(target, marker)
