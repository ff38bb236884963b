"""Greedy chat generation with vLLM's offline engine, run as its own process (vLLM's engine spawns workers).

    python -m draftsmith.engines.vllm_offline --model DIR --prompts prompts.jsonl --out result.json \
        [--speculative-config '{"method": "eagle3", "model": DRAFT_DIR, "num_speculative_tokens": 3}']

`prompts.jsonl` holds one OpenAI-format `messages` list per line. The result holds, per prompt, the generated
token ids and text, the run's timing (output tokens/s) and, with a draft, vLLM's speculative-decoding counters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def run_vllm_chat(model: str | Path, conversations: list[list[dict[str, str]]], max_tokens: int,
                  timeout_s: float = 900.0, dtype: str = "float32",
                  speculative_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the generator in a child process and return its result (raises with vLLM's log on failure)."""
    with tempfile.TemporaryDirectory(prefix="draftsmith-vllm-") as tmp:
        prompts, out = Path(tmp) / "prompts.jsonl", Path(tmp) / "result.json"
        prompts.write_text("".join(json.dumps(c) + "\n" for c in conversations))
        cmd = [sys.executable, "-m", "draftsmith.engines.vllm_offline", "--model", str(model), "--prompts",
               str(prompts), "--out", str(out), "--max-tokens", str(max_tokens), "--dtype", dtype]
        if speculative_config is not None:
            cmd += ["--speculative-config", json.dumps(speculative_config)]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        if proc.returncode != 0 or not out.is_file():
            # vLLM's own message can be buried under a long list (e.g. every supported architecture): lead with
            # the lines that name an error, each cut short, then the tail.
            errors = [line[:600] for line in proc.stderr.splitlines() if "error" in line.lower()][:8]
            raise RuntimeError(f"vLLM generation failed (exit {proc.returncode}):\n" + "\n".join(errors)
                               + f"\n...\n{proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def _generate(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from draftsmith.engines.vllm_cpu import cpu_engine_kwargs

    conversations = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    kwargs = {**cpu_engine_kwargs(), "dtype": args.dtype} if args.device == "cpu" else {"dtype": args.dtype}
    if args.speculative_config:
        kwargs["speculative_config"] = json.loads(args.speculative_config)
    llm = LLM(model=args.model, max_model_len=args.max_model_len, seed=0, enable_prefix_caching=False,
              disable_log_stats=not args.speculative_config, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    started = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    results = [{"text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids),
                "finish_reason": o.outputs[0].finish_reason} for o in outputs]
    generated = sum(len(r["token_ids"]) for r in results)
    return {"outputs": results, "seconds": seconds, "output_tokens": generated,
            "output_tokens_per_s": generated / seconds if seconds > 0 else 0.0,
            "spec_decode": _spec_decode_counters(llm) if args.speculative_config else None}


def _spec_decode_counters(llm) -> dict[str, Any]:
    """vLLM's speculative-decoding counters; mean acceptance length = 1 + accepted / drafts (tokens per step)."""
    from vllm.v1.metrics.reader import Counter, Vector

    counters: dict[str, Any] = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode"):
            key = metric.name.removeprefix("vllm:spec_decode_")
            if isinstance(metric, Counter):
                counters[key] = counters.get(key, 0) + metric.value
            elif isinstance(metric, Vector):
                previous = counters.get(key, [0] * len(metric.values))
                counters[key] = [a + b for a, b in zip(previous, metric.values, strict=True)]
    drafts = counters.get("num_drafts", 0)
    counters["acceptance_length"] = 1 + counters.get("num_accepted_tokens", 0) / drafts if drafts else None
    return counters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--speculative-config", default=None, help="vLLM speculative_config as JSON")
    args = parser.parse_args()
    Path(args.out).write_text(json.dumps(_generate(args)))


if __name__ == "__main__":
    main()
