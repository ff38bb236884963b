"""A load generator for the Serve endpoint, run as its own process so it does not share the server's event loop.

    python -m draftsmith.bench.load_client --url http://127.0.0.1:PORT/PREFIX --model ID --prompts FILE \
        --concurrency 4 --requests 16 --max-tokens 128 [--deadline 300]

Each of `concurrency` clients sends streaming chat requests one after another until `requests` were sent or the
deadline passed; prints one JSON object: requests, errors, wall time, requests/s, output tokens/s, and per-request
time to first token and latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int
                      ) -> dict[str, float | int | str | None]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft, tokens = None, 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if ttft is None and any((c.get("delta") or {}).get("content") for c in event.get("choices", [])):
                    ttft = time.perf_counter() - started
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if "error" in event:
                    return {"error": str(event["error"])[:200]}
    except httpx.HTTPError as exc:
        return {"error": repr(exc)[:200]}
    return {"ttft_s": ttft, "latency_s": time.perf_counter() - started, "output_tokens": tokens}


async def run_load(url: str, model: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int,
                   deadline_s: float) -> dict:
    if urlparse(url).hostname not in LOOPBACK:
        raise ValueError(f"{url}: the load test only runs against loopback")
    queue = list(range(requests))
    results: list[dict] = []
    stop_at = time.perf_counter() + deadline_s

    async def worker(client: httpx.AsyncClient):
        while queue and time.perf_counter() < stop_at:
            index = queue.pop()
            results.append(await one_request(client, url, model, prompts[index % len(prompts)], max_tokens))

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=deadline_s, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - started
    ok = [r for r in results if "error" not in r]
    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
            "error_samples": [r["error"] for r in results if "error" in r][:3], "wall_s": wall,
            "requests_per_s": len(ok) / wall, "output_tokens_per_s": sum(r["output_tokens"] for r in ok) / wall,
            "ttft_s": [r["ttft_s"] for r in ok if r["ttft_s"] is not None], "latency_s": [r["latency_s"] for r in ok]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="a JSON list of user prompts")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--deadline", type=float, default=300)
    args = parser.parse_args()
    prompts = json.loads(open(args.prompts).read())
    result = asyncio.run(run_load(args.url.rstrip("/"), args.model, prompts, args.concurrency, args.requests,
                                  args.max_tokens, args.deadline))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
