"""Peak resident memory of this process and the Ray workers it drives, sampled in the background."""

from __future__ import annotations

import threading

import psutil


def _ray_and_self_rss() -> int:
    me = psutil.Process()
    total = me.memory_info().rss
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        try:
            cmd = proc.info["cmdline"] or []
            if proc.pid != me.pid and cmd and cmd[0].startswith("ray::"):
                total += proc.info["memory_info"].rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError):
            continue
    return total


class PeakMemory:
    """Context manager: `peak_bytes` holds the largest total RSS seen (driver plus `ray::` worker processes)."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, _ray_and_self_rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, _ray_and_self_rss())
