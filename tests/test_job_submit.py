"""`ray job submit` of the pipeline against a real local head node started with `ray start --head`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, clean_env, TINY_BASE_OVERRIDES, free_port, wait_http

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture
def head_node(tmp_path):
    """A head node on loopback; stopped by terminating its own process (`ray stop` would stop every Ray here).

    Its agents get their own ports: the test session's local Ray already holds the default ones."""
    port, dashboard = free_port(), free_port()
    agent_ports = [a for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                  "--metrics-export-port", "--runtime-env-agent-port", "--ray-client-server-port")
                   for a in (flag, str(free_port()))]
    ray_tmp = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = clean_env(RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "8",
         "--include-dashboard", "true", "--temp-dir", ray_tmp, *agent_ports],
        env=env, stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{dashboard}/api/version", 180, proc)
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_ray_job_submit_runs_the_pipeline(tiny_base, head_node, tmp_path):
    out = tmp_path / "runs"
    overrides = [a for o in [f"output_dir={out}", *TINY_BASE_OVERRIDES] for a in ("--set", o)]
    cmd = [RAY, "job", "submit", "--address", head_node, "--working-dir", str(ROOT),
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
