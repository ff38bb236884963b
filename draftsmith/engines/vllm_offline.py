"""Chat generation with vLLM's offline engine, run as its own process (vLLM's engine spawns workers).

    python -m draftsmith.engines.vllm_offline --model DIR --plan plan.json --out result.json \
        [--speculative-config '{"method": "eagle3", "model": DRAFT_DIR, "num_speculative_tokens": 3}'] \
        [--engine-settings '{"enforce_eager": true, "in_process": true}']   # the recipe's `vllm` section

A plan is a list of generation runs on one engine (one engine start, so runs compare on equal terms). A run
holds conversations (`messages` to answer, then optional `followups`: later user turns, each asked after the
model's own previous answer, as in MT-bench), a temperature, `max_tokens` and a `concurrency` (requests in
flight at once). Per run the result holds each conversation's generated turns (token ids, text), wall time,
output tokens/s, per-request time to first token and time per output token, and, with a speculative config,
vLLM's speculative-decoding counters over that run alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from draftsmith.engines.vllm_args import engine_env
from draftsmith.engines.vllm_metrics import spec_decode_counters, spec_decode_delta
from draftsmith.recipe.schema import VllmSettings


def run_vllm_plan(model: str | Path, runs: list[dict[str, Any]], speculative_config: dict[str, Any] | None = None,
                  device: str = "cpu", dtype: str | None = None, max_model_len: int = 1024,
                  timeout_s: float = 1800.0, vllm: VllmSettings | None = None) -> list[dict[str, Any]]:
    """Run the plan in a child process and return one result per run (raises with vLLM's log on failure)."""
    with tempfile.TemporaryDirectory(prefix="draftsmith-vllm-") as tmp:
        plan, out = Path(tmp) / "plan.json", Path(tmp) / "result.json"
        plan.write_text(json.dumps(runs))
        cmd = [sys.executable, "-m", "draftsmith.engines.vllm_offline", "--model", str(model), "--plan", str(plan),
               "--out", str(out), "--device", device, "--max-model-len", str(max_model_len),
               "--engine-settings", (vllm or VllmSettings()).model_dump_json()]
        if dtype is not None:
            cmd += ["--dtype", dtype]
        if speculative_config is not None:
            cmd += ["--speculative-config", json.dumps(speculative_config)]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               **engine_env(vllm)}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        if proc.returncode != 0 or not out.is_file():
            # vLLM's own message can be buried under a long list (e.g. every supported architecture): lead with
            # the lines that name an error, each cut short, then the tail.
            errors = [line[:600] for line in proc.stderr.splitlines() if "error" in line.lower()][:8]
            raise RuntimeError(f"vLLM generation failed (exit {proc.returncode}):\n" + "\n".join(errors)
                               + f"\n...\n{proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def run_vllm_chat(model: str | Path, conversations: list[list[dict[str, str]]], max_tokens: int,
                  timeout_s: float = 900.0, dtype: str | None = None,
                  speculative_config: dict[str, Any] | None = None, device: str = "cpu",
                  vllm: VllmSettings | None = None) -> dict[str, Any]:
    """Greedy answers to `conversations` (message lists), all in flight at once; one result with `outputs`."""
    run = {"name": "chat", "conversations": [{"messages": c} for c in conversations], "temperature": 0.0,
           "max_tokens": max_tokens, "concurrency": max(1, len(conversations))}
    result = run_vllm_plan(model, [run], speculative_config, device=device, dtype=dtype, timeout_s=timeout_s,
                           vllm=vllm)[0]
    result["outputs"] = [c["turns"][0] for c in result["conversations"]]
    return result


# --------------------------------------------------------------------------------------- the child process
def _seed(run: str, index: int, turn: int) -> int:
    """Per-request sampling seed: the same request samples the same way with and without a draft."""
    return int.from_bytes(hashlib.sha256(f"{run}/{index}/{turn}".encode()).digest()[:4], "little") >> 1


def _counters(llm) -> dict[str, Any]:
    return spec_decode_counters(llm.get_metrics())


def _request_timing(output) -> tuple[float | None, float | None]:
    """(time to first token, time per output token after the first) of a finished request, in seconds."""
    stats = getattr(output, "metrics", None)
    if stats is None or not getattr(stats, "first_token_ts", 0):
        return None, None
    n = stats.num_generation_tokens
    tpot = (stats.last_token_ts - stats.first_token_ts) / (n - 1) if n > 1 else None
    return stats.first_token_latency, tpot


def _generate_run(llm, run: dict[str, Any], speculative: bool, max_model_len: int) -> dict[str, Any]:
    from vllm import SamplingParams

    conversations = run["conversations"]
    histories = [list(c["messages"]) for c in conversations]
    pending = [list(c.get("followups", [])) for c in conversations]
    results: list[dict[str, Any]] = [{"turns": []} for _ in conversations]
    ttft: list[float] = []
    tpot: list[float] = []
    concurrency = max(1, int(run.get("concurrency", 1)))
    before = _counters(llm) if speculative else {}
    started = time.perf_counter()
    turn = 0
    active = list(range(len(conversations)))
    tokenizer = llm.get_tokenizer()
    while active:
        # A turn whose history leaves no room in the context ends its conversation (vLLM would fail the batch).
        room = {i: max_model_len - len(tokenizer.apply_chat_template(
            histories[i], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]) for i in active}
        for i in active:
            if room[i] < 2:
                results[i]["truncated"] = True
                pending[i] = []
        active = [i for i in active if room[i] >= 2]
        for lo in range(0, len(active), concurrency):
            chunk = active[lo: lo + concurrency]
            params = [SamplingParams(temperature=float(run["temperature"]), top_p=float(run.get("top_p", 1.0)),
                                     max_tokens=min(int(run["max_tokens"]), room[i] - 1),
                                     seed=_seed(run["name"], i, turn)) for i in chunk]
            outputs = llm.chat([histories[i] for i in chunk], params, use_tqdm=False)
            for i, output in zip(chunk, outputs, strict=True):
                completion = output.outputs[0]
                results[i]["turns"].append({"text": completion.text, "token_ids": list(completion.token_ids),
                                            "finish_reason": completion.finish_reason})
                first, per_token = _request_timing(output)
                if first is not None:
                    ttft.append(first)
                if per_token is not None:
                    tpot.append(per_token)
                histories[i].append({"role": "assistant", "content": completion.text})
        # Follow-up turns are asked after the model's own answer, so each round waits for the previous one.
        active = [i for i in active if pending[i]]
        for i in active:
            histories[i].append({"role": "user", "content": pending[i].pop(0)})
        turn += 1
    seconds = time.perf_counter() - started
    generated = sum(len(t["token_ids"]) for r in results for t in r["turns"])
    return {"name": run["name"], "conversations": results, "seconds": seconds, "output_tokens": generated,
            "output_tokens_per_s": generated / seconds if seconds > 0 else 0.0, "ttft_s": ttft, "tpot_s": tpot,
            "spec_decode": spec_decode_delta(before, _counters(llm)) if speculative else None}


def _generate(args: argparse.Namespace) -> list[dict[str, Any]]:
    from vllm import LLM

    from draftsmith.engines.vllm_args import engine_args

    runs = json.loads(Path(args.plan).read_text())
    kwargs = engine_args(VllmSettings.model_validate_json(args.engine_settings), args.device)
    if args.dtype:
        kwargs["dtype"] = args.dtype
    if args.speculative_config:
        kwargs["speculative_config"] = json.loads(args.speculative_config)
    llm = LLM(model=args.model, max_model_len=args.max_model_len, seed=0, enable_prefix_caching=False,
              disable_log_stats=False, **kwargs)
    try:
        return [_generate_run(llm, run, bool(args.speculative_config), args.max_model_len) for run in runs]
    finally:
        llm.llm_engine.engine_core.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--plan", required=True, help="JSON list of runs (see the module docstring)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, the model's dtype on GPUs")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--speculative-config", default=None, help="vLLM speculative_config as JSON")
    parser.add_argument("--engine-settings", default="{}", help="the recipe's `vllm` section as JSON")
    args = parser.parse_args()
    Path(args.out).write_text(json.dumps(_generate(args)))


if __name__ == "__main__":
    main()
