"""Shared fixtures: real services started on loopback (MLflow server, local Ray) and a tiny embedded base."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Built artifacts (the tiny test base, DeepSpeed's compiled ops) are cached across test runs in the checkout.
os.environ.setdefault("DRAFTSMITH_CACHE_DIR", str(ROOT / ".cache" / "tests"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)

# A base small enough to build in about a minute, trained enough to end its turns (EOS share 1.0, final loss 0.88
# as built: test_embedded_base holds it to 0.9 and 1.2) though too small to answer exactly (the bench measures the
# default base's exact match).
TINY_BASE_OVERRIDES = [
    "base.embedded.corpus.num_train=1500",
    "base.embedded.corpus.num_heldout=20",
    "base.embedded.architecture.hidden_size=64",
    "base.embedded.architecture.intermediate_size=192",
    "base.embedded.architecture.num_hidden_layers=2",
    "base.embedded.pretraining.epochs=4",
    "base.embedded.pretraining.warmup_steps=10",
    "data.num_prompts=40",
]
# Enough synthesized conversations to train a draft that learns (the `training_root` fixture), and a short run.
DATA_OVERRIDES = [*TINY_BASE_OVERRIDES, "data.num_prompts=400", "training.validation_share=0.1"]
SHORT_TRAINING = ["training.micro_batch_size=8", "training.warmup_steps=5", "training.lr=3e-3",
                  "training.log_every=5"]
# The second half of the workflow on top of `training_root` (the `flow` fixture): the base's features stored, a
# short offline bf16 training from them (ZeRO-2, validated before, halfway and at the end, checkpointed twice) ->
# FP8 PTQ -> QAT -> export -> evaluation on a handful of prompts -> registry version through the gate. The
# draft-training tests read its training too.
FLOW_REGISTRY = "tiny-draft-under-test"
EVAL_SETS = (f"evaluation.prompt_sets=[{{name: embedded-heldout, limit: 3}}, {{name: embedded-mtbench, path: "
             f"{ROOT / 'platform/prompts/embedded-mtbench.jsonl'}, limit: 2}}]")
SHORT_EVALUATION = [EVAL_SETS, "evaluation.max_tokens=24", "evaluation.gate_limit=3"]
FLOW = [*SHORT_TRAINING, "training.base_features=offline", "training.steps=80", "training.eval_every=40",
        "training.checkpoint_every=40",
        "quantization.calibration_samples=32", "quantization.qat.steps=30", "quantization.qat.lr=1e-3",
        "export.verify_prompts=4", "export.verify_max_tokens=32", *SHORT_EVALUATION,
        f"tracking.registry_name={FLOW_REGISTRY}"]


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need a CUDA device: skipped, not failed, without one (`make gpu-check` runs them on one).

    The tests on the session's head node (`head_node`: job submission, then Serve) run next to each other, where
    the last of them stood, so the head node idles beside no other test (and the registry tests before Serve's
    see the flow's registered model before Serve's rollover test adds a version)."""
    on_head = [item for item in items if "head_node" in getattr(item, "fixturenames", ())]
    if on_head:
        at = sum(1 for item in items[: items.index(on_head[-1])] if item not in on_head)
        rest = [item for item in items if item not in on_head]
        items[:] = rest[:at] + on_head + rest[at:]
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `make gpu-check` on a GPU machine)")
    for item in gpu_items:
        item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not come up in {timeout_s} s")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child process as a user would have it: no tracking or registry URI leaked by
    `mlflow.set_tracking_uri` / `set_registry_uri` calls in this test process (MLflow exports both to the
    environment: a leaked registry URI sent `jobs.deploy` to another test's registry)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env.update(extra)
    return env


def run_job(module: str, *args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `python -m MODULE ARGS` from the project root, as a user would."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=clean_env(**(env or {})))


@dataclasses.dataclass(frozen=True)
class JobResult:
    returncode: int
    stdout: str
    stderr: str


def run_job_here(module: str, *args: str) -> JobResult:
    """Run `python -m MODULE ARGS` inside this process: the same `__main__` code and exit path, without the
    ~20 s of imports a fresh interpreter pays (more on CI). A job that runs stages joins this process's session
    Ray when one is up (`local_ray`) and leaves it running, as `run_recipe` does with a Ray it did not start; the
    environment and MLflow's URIs are put back afterwards (a job sets both). Fresh `python -m` runs of the
    pipeline, train, synthesize and deploy jobs stay elsewhere (`run_job`, a killed job's Popen)."""
    import io
    import runpy

    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils

    saved_env, saved_argv = dict(os.environ), sys.argv
    saved_uris = tracking_utils._tracking_uri, registry_utils._registry_uri
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [module, *args]
    # The job starts as a fresh process would: no MLflow URI an earlier test set (in MLflow's globals, or exported
    # to the environment, where a job's own tracking resolution would find it and log there instead).
    job_env = clean_env()
    os.environ.clear()
    os.environ.update(job_env)
    tracking_utils._tracking_uri, registry_utils._registry_uri = None, None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved_uris
    return JobResult(code, out.getvalue(), err.getvalue())


@dataclasses.dataclass(frozen=True)
class HeadNode:
    dashboard: str  # http://127.0.0.1:PORT, what `ray job submit` and `jobs.deploy` talk to
    pid: int  # the `ray start --head --block` process: every process of this cluster descends from it


@contextlib.contextmanager
def head_node_at(log_dir: Path, env: dict[str, str] | None = None):
    """A Ray head node with its dashboard on loopback (what `ray job submit` and `serve deploy` talk to); yields
    a HeadNode. Stopped by terminating its own process (`ray stop` would stop every Ray here).

    Its agents get their own ports: the test session's local Ray already holds the default ones."""
    from draftsmith.cluster import LOCAL_TRAIN_ENV

    port, dashboard = free_port(), free_port()
    agent_ports = [a for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                  "--metrics-export-port", "--runtime-env-agent-port", "--ray-client-server-port")
                   for a in (flag, str(free_port()))]
    ray_tmp = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus",
         "8", "--include-dashboard", "true", "--temp-dir", ray_tmp, *agent_ports],
        # One local node, as draftsmith's own local Ray: no preemption watcher or Train metrics (cluster.py).
        env=clean_env(RAY_AUTH_MODE="disabled", **dict.fromkeys(LOCAL_TRAIN_ENV, "0"), **(env or {})),
        stdout=open(log_dir / "head.log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{dashboard}/api/version", 180, proc)
        yield HeadNode(f"http://127.0.0.1:{dashboard}", proc.pid)
    finally:
        # Killed, not stopped: a graceful stop drains Serve's replicas and their engines (about 35 s), and nothing
        # of this throwaway cluster needs saving. Its processes all descend from the `ray start` process.
        import psutil

        try:
            cluster = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:  # the head node died by itself
            cluster = []
        proc.kill()
        for member in cluster:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        proc.wait(timeout=60)
        psutil.wait_procs(cluster, timeout=60)
        if os.environ.get("DRAFTSMITH_KEEP_HEAD_LOGS"):  # Serve's controller and replica logs, to read afterwards
            print(f"head node's Ray logs kept in {ray_tmp}", file=sys.stderr)
        else:
            shutil.rmtree(ray_tmp, ignore_errors=True)


def submit_job(head: HeadNode, module: str, *args: str, wait: bool = True,
               submission_id: str | None = None) -> subprocess.CompletedProcess:
    """`ray job submit` of `python -m MODULE ARGS` to the head node, with this checkout as the working dir and the
    project's runtime_env, as the README tells a user to; `wait=False` returns once it is submitted."""
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", head.dashboard, "--working-dir",
           str(ROOT), "--runtime-env", str(ROOT / "platform" / "runtime_env.yaml"), *([] if wait else ["--no-wait"]),
           *(["--submission-id", submission_id] if submission_id else []), "--", sys.executable, "-m", module, *args]
    for _ in range(20):  # the head's job agent registers a few seconds after the dashboard answers
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                                env=clean_env(RAY_AUTH_MODE="disabled"))
        if "No available agent" not in result.stderr:
            return result
        time.sleep(2)
    return result


def job_running(head: HeadNode, submission_id: str) -> bool:
    """Whether the submitted job is still pending or running (the Jobs API on the head's dashboard)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head.dashboard)
    if client.get_job_status(submission_id) in (JobStatus.PENDING, JobStatus.RUNNING):
        return True
    print(f"job {submission_id} ended; its log ends with:\n{client.get_job_logs(submission_id)[-3000:]}")
    return False


def head_processes(head: HeadNode, marker: str, since: float = 0.0) -> list:
    """Live processes of the head node's cluster whose command line holds `marker`, started at or after `since`."""
    import psutil

    found = []
    for proc in psutil.Process(head.pid).children(recursive=True):
        try:
            if proc.create_time() >= since and proc.status() != psutil.STATUS_ZOMBIE and \
                    any(marker in part for part in proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def kill_submitted_job(head: HeadNode, module: str) -> int:
    """SIGKILL the drivers of submitted `python -m MODULE` jobs; returns how many. Ray runs each entrypoint in a
    session of its own (shell and Python), so its process group is the job and nothing else, and the job's actors
    die with their owner."""
    groups = set()
    for proc in head_processes(head, module):
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(proc.pid))
    groups.discard(os.getpgrp())  # never this session's own group (the head node's processes share it)
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    return len(groups)


@pytest.fixture(scope="session")
def head_node(tmp_path_factory) -> HeadNode:
    """One head node for the session: `ray job submit` runs on it, and the Serve endpoint is deployed on it."""
    with head_node_at(tmp_path_factory.mktemp("head-node")) as head:
        yield head


_MLFLOW_SERVER: dict = {}


def start_mlflow_server(root: Path) -> None:
    """Start the session's `mlflow server` without waiting for it (once): `training_root` starts it before its
    synthesis, so the server is up by the time `mlflow_server` is first asked for."""
    if _MLFLOW_SERVER:
        return
    port = free_port()
    _MLFLOW_SERVER.update(proc=mlflow_server_process(root, port), uri=f"http://127.0.0.1:{port}")


def mlflow_server_process(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port` with its database and artifacts under `root` (not waited for)."""
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
         str(root / "artifacts"), "--workers", "1"],
        stdout=open(root / "server.log", "a"), stderr=subprocess.STDOUT,
        # MLflow's job runner (six processes for its GenAI jobs) has nothing to do here.
        env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), start_new_session=True,
    )


def pytest_sessionfinish(session, exitstatus):
    if _MLFLOW_SERVER:
        with contextlib.suppress(ProcessLookupError):  # the server and its worker: a process group of their own
            os.killpg(_MLFLOW_SERVER["proc"].pid, signal.SIGTERM)
        _MLFLOW_SERVER["proc"].wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback with a sqlite backend (the Model Registry needs a database)."""
    start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    wait_http(f"{_MLFLOW_SERVER['uri']}/health", 120, _MLFLOW_SERVER["proc"])
    return _MLFLOW_SERVER["uri"]


@pytest.fixture(scope="session")
def tiny_recipe():
    from draftsmith.recipe.loader import load_recipe

    return load_recipe("tiny-eagle3", TINY_BASE_OVERRIDES)


@pytest.fixture(scope="session")
def local_ray() -> str:
    """The session's local Ray, started by this process; its address lets a job subprocess join it (`ray.address`)
    instead of starting a Ray of its own."""
    import ray

    from draftsmith import cluster
    from draftsmith.recipe.schema import RaySettings

    cluster.connect(RaySettings(num_cpus=8))
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_base(tiny_recipe, local_ray, tmp_path_factory) -> Path:
    """The tiny embedded base, built once (or found in the cache) with a throwaway local MLflow."""
    from draftsmith import tracking
    from draftsmith.embedded.build import build_embedded_base

    tracking_dir = tmp_path_factory.mktemp("tiny-base-tracking")
    tracking.configure(tiny_recipe.tracking, tracking_dir)
    return build_embedded_base(tiny_recipe.base.embedded, tracking_uri=tracking.current_uri())


@pytest.fixture(scope="session")
def training_root(tiny_base, local_ray, tmp_path_factory) -> Path:
    """A run folder whose stages up to `dataset` are done: 400 conversations the tiny base synthesized with vLLM
    (CPU), tokenized. Shared by the draft-training and the quantize/export/register tests."""
    from draftsmith import tracking
    from draftsmith.pipeline.runner import run_pipeline
    from draftsmith.recipe.loader import load_recipe
    from draftsmith.stages import pipeline_stages

    start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))  # the flow's, starting while this runs
    root = tmp_path_factory.mktemp("draft-training")
    recipe = load_recipe("tiny-eagle3", [*DATA_OVERRIDES, f"output_dir={root}"])
    tracking.configure(recipe.tracking, root)
    results = run_pipeline(recipe, pipeline_stages("dataset"))
    assert results["dataset"].outputs.train > 300
    return root


@pytest.fixture(scope="session")
def flow(training_root, mlflow_server):
    """(recipe, stage results) of the whole pipeline on `training_root` against the MLflow server."""
    from draftsmith import tracking
    from draftsmith.pipeline.runner import run_pipeline
    from draftsmith.recipe.loader import load_recipe
    from draftsmith.stages import pipeline_stages

    recipe = load_recipe("tiny-eagle3", [*DATA_OVERRIDES, f"output_dir={training_root}", *FLOW,
                                         f"tracking.uri={mlflow_server}"])
    tracking.configure(recipe.tracking, training_root)
    return recipe, run_pipeline(recipe, pipeline_stages("register"))
