"""A small deployment the engine replicas report to, so one scrape of the ingress sees every replica."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import serve

log = logging.getLogger(__name__)

REPORT_EVERY_S = 2.0
STALE_AFTER_S = 15.0  # a replica that stopped reporting (replaced, scaled down) drops out


class EngineStatsBoard:
    def __init__(self):
        self._reports: dict[str, dict[str, Any]] = {}

    def report(self, replica: str, stats: dict[str, Any]) -> None:
        self._reports[replica] = {**stats, "reported_at": time.time()}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        self._reports = {r: s for r, s in self._reports.items() if now - s["reported_at"] < STALE_AFTER_S}
        return dict(self._reports)


def start_reporting(board, collect) -> asyncio.Task:
    """Report `await collect()` to the board every few seconds from this engine replica (until it stops)."""
    replica = serve.get_replica_context().replica_id.unique_id

    async def loop():
        while True:
            try:
                await board.report.remote(replica, await collect())
            except Exception:  # the board restarting must not take the engine down
                log.warning("engine stats report failed", exc_info=True)
            await asyncio.sleep(REPORT_EVERY_S)

    return asyncio.get_running_loop().create_task(loop())
