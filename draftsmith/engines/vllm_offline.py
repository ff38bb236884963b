"""Chat generation with vLLM's offline engine, run as its own process (vLLM's engine spawns workers).

On CPU the process is forked from a server that has imported vLLM (see `_warm_context`); on GPUs, and from the
command line, it is a fresh interpreter:

    python -m draftsmith.engines.vllm_offline --engines engines.json --out result.json \
        [--engine-settings '{"enforce_eager": true, "in_process": true}']   # the recipe's `vllm` section

`engines.json` lists engines, started one after another in this one process (each shut down before the next
starts, so runs compare on equal terms, and a job pays vLLM's import once, not once per engine): each names its
`model`, an optional `speculative_config` (e.g. {"method": "eagle3", "model": DRAFT_DIR,
"num_speculative_tokens": 3}), `max_model_len` and a plan of generation runs on that engine. A run holds
conversations (`messages` to answer, then optional `followups`: later user turns, each asked after the model's
own previous answer, as in MT-bench), a temperature, `max_tokens` and a `concurrency` (requests in flight at
once). Per run the result holds each conversation's generated turns (token ids, text), wall time, output
tokens/s, per-request time to first token and time per output token, and, with a speculative config, vLLM's
speculative-decoding counters over that run alone. A completion run (`completion_run`) instead samples a raw
token prompt many times (self-generated prompts) and returns the samples.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
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

logger = logging.getLogger(__name__)


def engine_plan(model: str | Path, runs: list[dict[str, Any]], speculative_config: dict[str, Any] | None = None,
                max_model_len: int = 1024, engine_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One engine of `run_vllm_engines`: the base, its speculation (None: none), more engine arguments, and the
    runs it generates."""
    return {"model": str(model), "speculative_config": speculative_config, "max_model_len": max_model_len,
            "engine_kwargs": engine_kwargs or {}, "runs": runs}


def run_vllm_engines(engines: list[dict[str, Any]], device: str = "cpu", dtype: str | None = None,
                     timeout_s: float = 1800.0, vllm: VllmSettings | None = None) -> list[list[dict[str, Any]]]:
    """Start each engine (`engine_plan`) in turn in one child process (`timeout_s` for each); per engine, one
    result per run (raises with vLLM's log on failure)."""
    with tempfile.TemporaryDirectory(prefix="draftsmith-vllm-") as tmp:
        plan, out, log = Path(tmp) / "engines.json", Path(tmp) / "result.json", Path(tmp) / "vllm.log"
        plan.write_text(json.dumps(engines))
        settings = (vllm or VllmSettings()).model_dump_json()
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "VLLM_ENABLE_V1_MULTIPROCESSING": "1", **engine_env(vllm)}
        timeout = timeout_s * len(engines)
        if device == "cpu":
            code = _run_forked(plan, out, log, device, dtype, settings, env, timeout)
        else:  # a CUDA context must not come from a forked parent: a fresh interpreter
            cmd = [sys.executable, "-m", "draftsmith.engines.vllm_offline", "--engines", str(plan), "--out",
                   str(out), "--device", device, "--engine-settings", settings]
            if dtype is not None:
                cmd += ["--dtype", dtype]
            with open(log, "w") as log_file:
                code = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout,
                                      env=env).returncode
        if code != 0 or not out.is_file():
            # vLLM's own message can be buried under a long list (e.g. every supported architecture): lead with
            # the lines that name an error, each cut short, then the tail.
            text = log.read_text(errors="replace") if log.is_file() else ""
            errors = [line[:600] for line in text.splitlines() if "error" in line.lower()][:8]
            raise RuntimeError(f"vLLM generation failed (exit {code}):\n" + "\n".join(errors)
                               + f"\n...\n{text[-2000:]}")
        return json.loads(out.read_text())


# What the forkserver imports before it forks anything: vLLM's package alone is a lazy shell, so the modules an
# offline engine loads are named (a name a later vLLM drops is skipped by the forkserver, costing only its import).
WARM_MODULES = ["draftsmith.engines.vllm_offline", "vllm.entrypoints.llm", "vllm.v1.engine.core",
                "vllm.v1.worker.cpu_worker", "vllm.model_executor.models.llama", "vllm.v1.spec_decode.eagle"]


def _warm_context():
    """Processes forked from a server that imported vLLM once (`multiprocessing`'s forkserver, started on first
    use and kept for the life of this process): the first engine process of a job pays the imports, every later
    one, in any stage of the same job, starts with them done (the embedded base's engine process: 4 s instead of
    about 30 s for a fresh interpreter on 2 cores)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WARM_MODULES)
    return context


def warm_engine_server() -> None:
    """Start the forkserver and wait until it has imported vLLM (a benchmark's first engine then starts on the
    same terms as the others)."""
    child = _warm_context().Process(target=int, name="draftsmith-vllm-warmup")
    child.start()
    child.join()


def _run_forked(plan: Path, out: Path, log: Path, device: str, dtype: str | None, settings: str,
                env: dict[str, str], timeout_s: float) -> int | None:
    child = _warm_context().Process(target=_forked_main, args=(plan, out, log, device, dtype, settings, env),
                                    name="draftsmith-vllm")
    child.start()
    relay_progress(child, log, timeout_s)
    if child.is_alive():
        child.kill()
        child.join()
        raise TimeoutError(f"vLLM generation did not finish in {timeout_s:.0f} s (log: {log})")
    return child.exitcode


PROGRESS_EVERY_S = 30.0


def relay_progress(child, log: Path, timeout_s: float) -> None:
    """Wait for the engine process (up to `timeout_s`), logging the newest of vLLM's own throughput lines ("Avg
    generation throughput ... Running: N reqs, Waiting: M reqs") from its log every PROGRESS_EVERY_S: a long
    generation shows progress in the job's terminal and log file, a line at a time."""
    deadline, shown = time.monotonic() + timeout_s, ""
    while child.is_alive() and time.monotonic() < deadline:
        child.join(min(PROGRESS_EVERY_S, max(0.0, deadline - time.monotonic())))
        if not child.is_alive():
            break
        try:
            lines = [line for line in log.read_text(errors="replace").splitlines()[-50:]
                     if "generation throughput" in line]
        except OSError:
            lines = []
        if lines and lines[-1] != shown:
            shown = lines[-1]
            logger.info("vLLM: %s", shown.split("Engine 000: ")[-1])


def _forked_main(plan: Path, out: Path, log: Path, device: str, dtype: str | None, settings: str,
                 env: dict[str, str]) -> None:
    """The engine process: the caller's environment as of this call (the server has its start's), output and
    errors (vLLM's native code's too) into the log, then what `main` does."""
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    args = argparse.Namespace(engines=str(plan), out=str(out), device=device, dtype=dtype, engine_settings=settings)
    Path(out).write_text(json.dumps(_generate(args)))


def run_vllm_plan(model: str | Path, runs: list[dict[str, Any]], speculative_config: dict[str, Any] | None = None,
                  device: str = "cpu", dtype: str | None = None, max_model_len: int = 1024,
                  timeout_s: float = 1800.0, vllm: VllmSettings | None = None,
                  engine_kwargs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The runs on one engine: one result per run."""
    return run_vllm_engines([engine_plan(model, runs, speculative_config, max_model_len, engine_kwargs)],
                            device=device, dtype=dtype, timeout_s=timeout_s, vllm=vllm)[0]


def chat_run(conversations: list[list[dict[str, str]]], max_tokens: int) -> dict[str, Any]:
    """Greedy answers to `conversations` (message lists), all in flight at once."""
    return {"name": "chat", "conversations": [{"messages": c} for c in conversations], "temperature": 0.0,
            "max_tokens": max_tokens, "concurrency": max(1, len(conversations))}


def with_outputs(result: dict[str, Any]) -> dict[str, Any]:
    """A chat run's result with `outputs`: each conversation's one answer."""
    result["outputs"] = [c["turns"][0] for c in result["conversations"]]
    return result


def run_vllm_chat(model: str | Path, conversations: list[list[dict[str, str]]], max_tokens: int,
                  timeout_s: float = 900.0, dtype: str | None = None,
                  speculative_config: dict[str, Any] | None = None, device: str = "cpu",
                  vllm: VllmSettings | None = None) -> dict[str, Any]:
    """Greedy answers to `conversations` (message lists), all in flight at once; one result with `outputs`."""
    return with_outputs(run_vllm_plan(model, [chat_run(conversations, max_tokens)], speculative_config,
                                      device=device, dtype=dtype, timeout_s=timeout_s, vllm=vllm)[0])


def completion_run(name: str, prompt_token_ids: list[int], count: int, *, temperature: float, top_p: float,
                   max_tokens: int, seed: int, stop_token_ids: list[int] = (), stop: list[str] = ()) -> dict[str, Any]:
    """`count` samples continuing one raw token prompt (no chat template: the caller rendered it), each with its
    own seed, all in flight at once."""
    return {"name": name, "prompt_token_ids": list(prompt_token_ids), "count": count, "temperature": temperature,
            "top_p": top_p, "max_tokens": max_tokens, "seed": seed, "stop_token_ids": list(stop_token_ids),
            "stop": list(stop)}


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


def _complete_run(llm, run: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=run["prompt_token_ids"])
    params = [SamplingParams(temperature=float(run["temperature"]), top_p=float(run["top_p"]),
                             max_tokens=int(run["max_tokens"]), seed=_seed(run["name"], int(run["seed"]), i),
                             stop_token_ids=run["stop_token_ids"] or None, stop=run["stop"] or None)
              for i in range(int(run["count"]))]
    started = time.perf_counter()
    outputs = llm.generate([prompt] * len(params), params, use_tqdm=False)
    seconds = time.perf_counter() - started
    samples = [{"text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids),
                "finish_reason": o.outputs[0].finish_reason} for o in outputs]
    generated = sum(len(x["token_ids"]) for x in samples)
    return {"name": run["name"], "samples": samples, "seconds": seconds, "output_tokens": generated,
            "output_tokens_per_s": generated / seconds if seconds > 0 else 0.0}


def _warm_up(llm, runs: list[dict[str, Any]]) -> None:
    """One short untimed request before an engine's timed runs: its first call pays one-time costs (n-gram
    speculation JIT-compiles its numba proposer then: on the embedded base's short gate set that alone made n-gram
    measure 0.17x the base). Counters are taken per run, so this request counts nowhere."""
    from vllm import SamplingParams

    first = next((r["conversations"][0] for r in runs if r.get("conversations")), None)
    if first is not None:
        llm.chat([list(first["messages"])], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)


def _generate(args: argparse.Namespace) -> list[list[dict[str, Any]]]:
    import gc

    from vllm import LLM

    from draftsmith.engines.vllm_args import engine_args

    kwargs = engine_args(VllmSettings.model_validate_json(args.engine_settings), args.device)
    if args.dtype:
        kwargs["dtype"] = args.dtype
    results = []
    for engine in json.loads(Path(args.engines).read_text()):
        speculative = engine.get("speculative_config")
        llm = LLM(model=engine["model"], max_model_len=engine["max_model_len"], seed=0, enable_prefix_caching=False,
                  disable_log_stats=False, **({"speculative_config": speculative} if speculative else {}),
                  **{**kwargs, **engine.get("engine_kwargs", {})})
        try:
            _warm_up(llm, engine["runs"])
            results.append([_complete_run(llm, run) if "prompt_token_ids" in run
                            else _generate_run(llm, run, bool(speculative), engine["max_model_len"])
                            for run in engine["runs"]])
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()  # the next engine's KV cache takes this one's memory
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", required=True, help="JSON list of engines and their runs (see above)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default=None, help="default: the engine settings' dtype (vllm.dtype)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--engine-settings", default="{}", help="the recipe's `vllm` section as JSON")
    args = parser.parse_args()
    Path(args.out).write_text(json.dumps(_generate(args)))


if __name__ == "__main__":
    main()
