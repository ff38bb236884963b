"""Greedy chat generation with vLLM's offline engine, run as its own process (vLLM's engine spawns workers).

    python -m draftsmith.engines.vllm_offline --model DIR --prompts prompts.jsonl --out result.json

`prompts.jsonl` holds one OpenAI-format `messages` list per line. The result holds, per prompt, the generated
token ids and text, and the run's timing (output tokens/s).
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
                  timeout_s: float = 900.0, dtype: str = "float32") -> dict[str, Any]:
    """Run the generator in a child process and return its result (raises with vLLM's log on failure)."""
    with tempfile.TemporaryDirectory(prefix="draftsmith-vllm-") as tmp:
        prompts, out = Path(tmp) / "prompts.jsonl", Path(tmp) / "result.json"
        prompts.write_text("".join(json.dumps(c) + "\n" for c in conversations))
        cmd = [sys.executable, "-m", "draftsmith.engines.vllm_offline", "--model", str(model), "--prompts",
               str(prompts), "--out", str(out), "--max-tokens", str(max_tokens), "--dtype", dtype]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"vLLM generation failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def _generate(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from draftsmith.engines.vllm_cpu import cpu_engine_kwargs

    conversations = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    kwargs = {**cpu_engine_kwargs(), "dtype": args.dtype} if args.device == "cpu" else {"dtype": args.dtype}
    llm = LLM(model=args.model, max_model_len=args.max_model_len, seed=0, enable_prefix_caching=False, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    started = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    results = [{"text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids),
                "finish_reason": o.outputs[0].finish_reason} for o in outputs]
    generated = sum(len(r["token_ids"]) for r in results)
    return {"outputs": results, "seconds": seconds, "output_tokens": generated,
            "output_tokens_per_s": generated / seconds if seconds > 0 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    args = parser.parse_args()
    Path(args.out).write_text(json.dumps(_generate(args)))


if __name__ == "__main__":
    main()
