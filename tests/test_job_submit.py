"""`ray job submit` of the pipeline against a real local head node started with `ray start --head`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY_BASE_OVERRIDES, clean_env

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")


def test_ray_job_submit_runs_the_pipeline(tiny_base, head_node, tmp_path):
    out = tmp_path / "runs"
    overrides = [a for o in [f"output_dir={out}", *TINY_BASE_OVERRIDES] for a in ("--set", o)]
    cmd = [RAY, "job", "submit", "--address", head_node.dashboard, "--working-dir", str(ROOT),
                "--runtime-env", str(ROOT / "platform" / "runtime_env.yaml"), "--",
           sys.executable, "-m", "jobs.pipeline", "--recipe", "tiny-eagle3", "--until", "prompts",
           *overrides]
    for _ in range(20):  # the head's job agent registers a few seconds after the dashboard answers
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                                env=clean_env(RAY_AUTH_MODE="disabled"))
        if "No available agent" not in result.stderr:
            break
        time.sleep(2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    markers = sorted(p.parent.name.split("-")[0] for p in out.glob("tiny-eagle3/*/_DONE.json"))
    assert markers == ["base", "prompts"]
    assert (out / "mlflow.db").is_file()  # the job tracked into the output folder it was given
