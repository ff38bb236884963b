"""When the ingress sends a failed engine call again: a time budget, not a count, because what it waits for
(Serve's health check taking a dead replica out of rotation) takes longer the busier the machine is."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

BACKOFF_S = (1.0, 2.0, 4.0)  # then every BACKOFF_S[-1] seconds


async def retry_attempts(budget_s: float, *, clock=time.monotonic, sleep=asyncio.sleep) -> AsyncIterator[int]:
    """Yield 0 at once, then 1, 2, ... after each backoff, while the wait so far stays within `budget_s`."""
    started = clock()
    attempt = 0
    while True:
        yield attempt
        pause = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
        if clock() + pause - started > budget_s:
            return
        await sleep(pause)
        attempt += 1
