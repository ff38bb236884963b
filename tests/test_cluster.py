"""How draftsmith starts or joins Ray (without starting one: `ray.init` is recorded, not run)."""

from __future__ import annotations

import pytest

from draftsmith import cluster
from draftsmith.recipe.schema import RaySettings


@pytest.fixture
def recorded_init(monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", lambda **kwargs: calls.append(kwargs))
    for key in (*cluster.LOCAL_TRAIN_ENV, "RAY_ADDRESS"):  # set first, so that teardown puts back what was there
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    return calls


def test_a_local_ray_runs_ray_train_without_preemption_watcher_or_metrics(recorded_init, monkeypatch):
    import os

    monkeypatch.setenv("RAY_TRAIN_METRICS_ENABLED", "1")  # the user's own setting wins
    cluster.connect(RaySettings(num_cpus=3))
    (call,) = recorded_init
    assert call["address"] == "local" and call["num_cpus"] == 3
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert os.environ["RAY_TRAIN_METRICS_ENABLED"] == "1"
    assert str(cluster.PROJECT_ROOT) in call["runtime_env"]["env_vars"]["PYTHONPATH"]


def test_a_joined_cluster_keeps_ray_trains_defaults(recorded_init, monkeypatch):
    import os

    monkeypatch.setattr(cluster, "check_reachable", lambda settings: None)
    cluster.connect(RaySettings(address="10.0.0.1:6379"))
    (call,) = recorded_init
    assert call["address"] == "10.0.0.1:6379"
    assert not any(key in os.environ for key in cluster.LOCAL_TRAIN_ENV)  # its preemption watcher stays on
