"""The second half of the workflow on the tiny embedded base, with real Ray Train + DeepSpeed, vLLM (CPU) and an
MLflow server: a short bf16 training -> FP8 PTQ -> QAT -> export (round-tripped in vLLM) -> registry version
loaded back as a pyfunc by alias."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from mlflow import MlflowClient

from conftest import FLOW_REGISTRY as REGISTRY_NAME, clean_env, run_job_here
from draftsmith import tracking
from draftsmith.export.engine_configs import TRTLLM_FILE
from draftsmith.export.manifest import read_manifest
from draftsmith.export.trtllm_schema import EngineConfigError, check_trtllm_options
from draftsmith.registry.register import RegistryError, register_export

pytestmark = pytest.mark.slow

def _history(run_id: str, key: str) -> list[float]:
    return tracking.metric_history(run_id, key)[1]


def test_qat_lowers_the_loss_of_the_quantized_draft(flow):
    _, results = flow
    quantized = results["quantize"].outputs
    assert quantized.quantization.format == "fp8" and quantized.quantizers["draft"] > 0
    assert quantized.quantizers["base"] > 0  # the base is quantized too (recipe default) ...
    assert (results["quantize"].directory / "base" / "hf_quant_config.json").is_file()  # ... and exported
    qat_run = results["qat"].mlflow_run_id
    loss = _history(qat_run, "val/loss")
    assert len(loss) == 2 and loss[-1] < loss[0], loss  # step 0 is the PTQ model, the last the QAT one
    report = results["qat"].outputs.report
    assert set(report) == {"bf16", "ptq", "qat"} and report["ptq"]["loss"] == pytest.approx(loss[0])
    assert {a.path for a in MlflowClient().list_artifacts(qat_run, "plots")} >= {"plots/quantization.png"}


def test_export_round_trips_through_vllm_losslessly(flow):
    _, results = flow
    export = results["export"].outputs
    verification = export.verification
    assert verification.prompts == 4 and verification.identical, verification
    assert 1.0 <= verification.acceptance_length <= 4.0 and verification.num_drafts > 0
    manifest = read_manifest(results["export"].directory / "export")
    assert manifest.draft.variants == {"trtllm": "draft", "vllm": "draft-vllm",
                                             "vllm_cpu": "draft-vllm-dequantized"}
    assert manifest.draft.checks["trtllm"]["quantized_weights"] > 0
    assert manifest.quantized_base == "base"
    options = yaml.safe_load((results["export"].directory / "export" / TRTLLM_FILE).read_text())
    check_trtllm_options(options)
    options["speculative_config"]["max_draft_length"] = 3
    with pytest.raises(EngineConfigError, match="max_draft_length"):
        check_trtllm_options(options)


def test_registered_version_has_lineage_and_its_pyfunc_generates(flow, mlflow_server, tmp_path):
    recipe, results = flow
    registered = results["register"].outputs
    client = MlflowClient()
    # The first version of a name has no champion to beat: the gate promotes it.
    assert registered.alias == "champion" and registered.gate.reason == "no champion yet"
    version = client.get_model_version_by_alias(REGISTRY_NAME, "champion")
    assert version.version == registered.version and version.tags["draftsmith.gate"] == "promoted"
    tags = version.tags
    assert tags["draftsmith.algorithm"] == "eagle3" and tags["draftsmith.quantization"] == "fp8"
    assert tags["draftsmith.base_model_hash"] == results["base"].outputs.model_hash
    assert tags["draftsmith.run.train"] == results["train"].mlflow_run_id
    assert tags["draftsmith.run.qat"] == results["qat"].mlflow_run_id
    assert int(tags["draftsmith.dataset.train"]) == results["dataset"].outputs.train
    assert len(tags["draftsmith.git_commit"]) >= 40 and tags["draftsmith.roundtrip_identical"] == "True"

    # A fresh process, as a user would: load by alias, generate.
    script = (
        "import mlflow, pandas as pd, json; "
        f"m = mlflow.pyfunc.load_model('models:/{REGISTRY_NAME}@champion', model_config={{'enforce_eager': True, 'in_process': True}}); "
        "out = m.predict(pd.DataFrame({'prompt': ['What is 3 + 4?', 'Sort: pear, fig, apple']}), "
        "params={'max_tokens': 24}); print('RESULT' + json.dumps(out))"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True, timeout=600,
                          env=clean_env(MLFLOW_TRACKING_URI=mlflow_server))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "were ignored" not in proc.stderr  # every key of the load-time model_config took effect
    texts = json.loads(proc.stdout.split("RESULT", 1)[1].splitlines()[0])
    assert len(texts) == 2 and all(isinstance(t, str) and t.strip() for t in texts), texts

    # Registering the same export again finds the version instead of adding one; aliases move through the API.
    again = register_export(name=REGISTRY_NAME, export_dir=results["export"].directory / "export",
                            base_dir=results["base"].outputs.model_dir,
                            recipe_file=results["register"].directory / "recipe.yaml", tags={},
                            num_speculative_tokens=3, alias="challenger")
    assert again["reused"] and again["version"] == registered.version
    assert client.get_model_version_by_alias(REGISTRY_NAME, "challenger").version == registered.version
    # The same name for another algorithm is refused before anything is written.
    client.set_registered_model_tag(REGISTRY_NAME, "draftsmith.algorithm", "medusa")
    try:
        with pytest.raises(RegistryError, match="holds medusa drafts"):
            register_export(name=REGISTRY_NAME, export_dir=results["export"].directory / "export",
                            base_dir=results["base"].outputs.model_dir,
                            recipe_file=results["register"].directory / "recipe.yaml", tags={},
                            num_speculative_tokens=3)
        # ... and the pipeline refuses it before any stage runs.
        refused = run_job_here("jobs.register", "--recipe", "tiny-eagle3", "--set", f"tracking.uri={mlflow_server}",
                          "--set", f"tracking.registry_name={REGISTRY_NAME}", "--set", f"output_dir={tmp_path}")
        assert refused.returncode == 2 and "holds medusa drafts" in refused.stderr, refused.stderr[-2000:]
        assert not any(tmp_path.iterdir())
    finally:
        client.set_registered_model_tag(REGISTRY_NAME, "draftsmith.algorithm", "eagle3")
    assert len(client.search_model_versions(f"name = '{REGISTRY_NAME}'")) == 1
