"""Connect to a Ray cluster, or start a local one, with errors that say how to fix an unreachable address."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import ray

from draftsmith import progress
from draftsmith.provenance import PROJECT_ROOT, git_commit
from draftsmith.recipe.schema import RaySettings

log = logging.getLogger(__name__)

LOCAL_TRAIN_ENV = ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_METRICS_ENABLED")


class ClusterError(RuntimeError):
    """Ray cannot be reached as configured."""


def cache_dir() -> Path:
    """Where built artifacts shared between recipes live (the embedded base, compiled DeepSpeed ops)."""
    path = Path(os.environ.get("DRAFTSMITH_CACHE_DIR", Path.home() / ".cache" / "draftsmith"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_lock(directory: Path) -> Iterator[None]:
    """One builder of a cached folder at a time; a second waits and then finds it built."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f"{directory.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def worker_env() -> dict[str, str]:
    """Environment every Ray worker gets: DeepSpeed's JIT ops compiled once into the cache, same commit tag."""
    env = {
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions")),
        "DRAFTSMITH_GIT_COMMIT": git_commit(),
        "DRAFTSMITH_CACHE_DIR": str(cache_dir()),
        "TOKENIZERS_PARALLELISM": "false",
    }
    return env


def _check_tcp(address: str, timeout_s: float = 3.0) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port (e.g. "auto"); ray.init reports its own error
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterError(
            f"no Ray cluster answers at {address} ({exc}). Start one with `ray start --head --port {port}`, "
            "or set ray.address to a running cluster's GCS address, or leave it unset to start a local Ray."
        ) from None


def check_reachable(settings: RaySettings) -> None:
    """Fail with how to fix it when the configured cluster address does not answer (no Ray is started)."""
    address = settings.address or os.environ.get("RAY_ADDRESS")
    if address and address != "auto":
        _check_tcp(address.removeprefix("ray://"))


def connect(settings: RaySettings) -> None:
    """Join the configured cluster, the one `ray job submit` runs us in ($RAY_ADDRESS), or start a local one."""
    if ray.is_initialized():
        return
    address = settings.address or os.environ.get("RAY_ADDRESS")
    # Only what this process's environment lacks: a `ray job submit` runtime env that already sets a key
    # conflicts with a driver that sets it again, and workers inherit the rest anyway. The progress settings this
    # process chose for itself (a log, not a terminal) are never the job's, and a worker cannot choose them: its
    # output is always a file.
    runtime_env = {"env_vars": {**{k: v for k, v in worker_env().items() if k not in os.environ},
                                **progress.worker_env()}}
    if address:
        check_reachable(settings)
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        except (ConnectionError, RuntimeError) as exc:
            raise ClusterError(
                f"cannot join the Ray cluster at {address}: {exc}. Check `ray status` on that machine, or leave "
                "ray.address unset to start a local Ray."
            ) from None
        log.info("joined Ray cluster at %s", address)
        return
    # A local cluster: put the project on the workers' path so they import this checkout, not a stale install.
    runtime_env["env_vars"]["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    # Ray Train's preemption watcher (an actor per worker group, for spot nodes) and its Prometheus metrics (read
    # by a dashboard this cluster does not start) have nothing to do on one local node; each costs a process start
    # per training run. Set here, before the cluster starts: its actors and the jobs that join it inherit them.
    for key in LOCAL_TRAIN_ENV:
        os.environ.setdefault(key, "0")
    # Without a dashboard there is no State API: a warning Ray Train repeats each second about it stays out of logs.
    runtime_env["worker_process_setup_hook"] = "draftsmith.progress.quiet_local_workers"
    # address="local": always a fresh cluster, never a stale one recorded by an earlier `ray start`.
    ray.init(address="local", num_cpus=settings.num_cpus, runtime_env=runtime_env, include_dashboard=False,
             log_to_driver=True)
    log.info("started a local Ray with %s logical CPUs", settings.num_cpus)
