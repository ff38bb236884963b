"""Benchmark of the EAGLE loss: peak memory and time of one loss forward+backward, ModelOpt's `_eagle_loss` against
the fused one (`draftsmith.draft.fused_loss`: the PyTorch twin on CPU, the Triton kernel on CUDA), at 4,096 tokens
and 32,000 / 128,256 draft vocabulary, bf16 (the training precision).

What is measured, per call of `loss, accuracy = <loss>(target, base token, draft logits, mask); loss.backward()`
with the inputs already made (draft logits [1, T, V] requiring grad, the base's logits and its softmax, a mask of
ones: every row counts, the fused kernel's worst case):
- CPU peak memory: the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs right before the
  call) minus the resident set then, in a fresh process per measurement (`python -m draftsmith.bench.loss_kernel
  --case ...`): every page the call touched beyond its inputs, the [T, V] gradient of the logits included.
- CUDA peak memory: `torch.cuda.max_memory_allocated()` minus `memory_allocated()` before (tensor bytes).
- Held for the backward: the bytes of the tensors autograd keeps from the forward (saved-tensor hooks), without
  the target, which ModelOpt's forward keeps for all TTT steps anyway; with the logits, which ModelOpt frees.
  Per TTT step, this much stays alive until the backward.
- Time: wall clock of the call (CUDA: synchronized), the median of the repeats; on CPU with all cores and with
  one thread, the processes of the variants taking turns.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TOKENS = 4096
VOCABS = (32000, 128256)
MODELOPT, FUSED, FUSED_IN_PLACE, FUSED_FROM_LOGITS, TWIN_ON_CUDA = (
    "ModelOpt _eagle_loss", "fused, gradient of its own", "fused, gradient over the logits (training's)",
    "fused, target as logits", "fused, twin on CUDA")
Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _variants(device: str) -> dict[str, tuple[str, Loss]]:
    """Name -> (the target it takes: base probabilities or base logits, the loss function). Only in a process of
    its own (a measurement, or gpu-check's): it keeps ModelOpt from importing vLLM, for a plugin never used here."""
    sys.modules.setdefault("vllm", None)
    from modelopt.torch.speculative.plugins.hf_eagle import HFEagleModel

    from draftsmith.draft.fused_loss import eagle_accuracy, fused_eagle_loss
    from kernels import soft_target_cross_entropy

    def from_logits(x: torch.Tensor, token: torch.Tensor, z: torch.Tensor, mask: torch.Tensor, impl: str = "auto"):
        return soft_target_cross_entropy(z, x, mask, target_is_logits=True, impl=impl), eagle_accuracy(token, z, mask)

    def own_gradient(p: torch.Tensor, token: torch.Tensor, z: torch.Tensor, mask: torch.Tensor):
        return soft_target_cross_entropy(z, p, mask), eagle_accuracy(token, z, mask)

    variants = {  # "fused" is the twin on CPU and the Triton kernel on CUDA
        MODELOPT: ("probabilities", lambda *args: HFEagleModel._eagle_loss(None, *args)),
        FUSED: ("probabilities", own_gradient),
        FUSED_IN_PLACE: ("probabilities", lambda *args: fused_eagle_loss(None, *args)),
        FUSED_FROM_LOGITS: ("logits", from_logits),
    }
    if device == "cuda":
        variants[TWIN_ON_CUDA] = ("probabilities", lambda p, token, z, mask: (
            soft_target_cross_entropy(z, p, mask, impl="torch"), eagle_accuracy(token, z, mask)))
    return variants


def _inputs(tokens: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(1, tokens, vocab, generator=gen, device=device, dtype=torch.bfloat16).requires_grad_()
    logits = torch.randn(1, tokens, vocab, generator=gen, device=device, dtype=torch.bfloat16)
    return {"z": z, "logits": logits, "probabilities": torch.softmax(logits, dim=-1),  # as ModelOpt makes it
            "token": logits.argmax(dim=-1), "mask": torch.ones(1, tokens, dtype=torch.long, device=device)}


def _held_for_backward_mib(loss_fn: Loss, args: tuple[torch.Tensor, ...], exclude: torch.Tensor) -> float:
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn(*args)
    storages.pop(exclude.untyped_storage().data_ptr(), None)
    return sum(storages.values()) / 2**20


def _status_mib(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def measure_cpu(variant: str, tokens: int, vocab: int, calls: int = 2) -> dict[str, Any]:
    """One fresh process's measurement of `variant` (see the module docstring): the peak of its first call, then
    times with all cores and with one (as each of the default two training workers on two cores gets)."""
    target_kind, loss_fn = _variants("cpu")[variant]
    inputs = _inputs(tokens, vocab, "cpu")
    z, target = inputs["z"], inputs[target_kind]
    logits = z.detach().clone()  # the values, put back before each call (one variant writes its gradient over z)
    # The loss gets a view of z, as training's loss gets the lm_head's output: the gradient flows on to z.grad
    # without the copy autograd makes of a gradient that shares storage with the leaf it is for.
    args = lambda: (target, inputs["token"], z.view_as(z), inputs["mask"])  # noqa: E731
    small = _inputs(8, 64, "cpu")  # first use of every operator, outside the measurement
    loss_fn(small[target_kind], small["token"], small["z"].view_as(small["z"]), small["mask"])[0].backward()
    cores = torch.get_num_threads()
    seconds: dict[str, list[float]] = {"all_cores": [], "one_thread": []}
    peak = 0.0
    for call in range(2 * calls):
        threads = "all_cores" if call % 2 == 0 else "one_thread"
        torch.set_num_threads(cores if threads == "all_cores" else 1)
        z.grad = None
        with torch.no_grad():
            z.copy_(logits)
        call_args = args()
        before = _status_mib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        started = time.perf_counter()
        loss, _ = loss_fn(*call_args)
        loss.backward()
        seconds[threads].append(time.perf_counter() - started)
        if call == 0:
            peak = _status_mib("VmHWM") - before
    z.grad = None
    with torch.no_grad():
        z.copy_(logits)
    held = _held_for_backward_mib(loss_fn, args(), target)
    return {"peak_mib": peak, **seconds, "held_mib": held, "loss": loss.item()}


def loss_kernel_section(tokens: int = TOKENS, vocabs: tuple[int, ...] = VOCABS, repeats: int = 3):
    """The CPU table: every (vocabulary, variant, repeat) in its own process, the variants taking turns."""
    import psutil

    from draftsmith.bench.report import Section

    names = [MODELOPT, FUSED, FUSED_IN_PLACE, FUSED_FROM_LOGITS]
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for vocab in vocabs:
        for _ in range(repeats):
            for name in names:
                case = json.dumps({"variant": name, "tokens": tokens, "vocab": vocab})
                out = subprocess.run([sys.executable, "-m", "draftsmith.bench.loss_kernel", "--case", case],
                                     capture_output=True, text=True, timeout=900)
                if out.returncode != 0:
                    raise RuntimeError(f"loss-kernel measurement {case} failed:\n{out.stderr[-3000:]}")
                runs.setdefault((vocab, name), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    cores = os.cpu_count()
    section = Section(f"EAGLE loss, one forward+backward: ModelOpt's against the fused one (CPU: the PyTorch twin; "
                      f"{tokens} tokens, bf16)",
                      ["draft vocabulary", "loss", "peak memory beyond inputs (MiB)", "peak ratio to ModelOpt",
                       "held for backward (MiB)", "time, 1 thread (s)", "time ratio, 1 thread",
                       f"time, {cores} threads (s)", f"time ratio, {cores} threads", "loss value"])

    def median(vocab: int, name: str, key: str) -> float:
        values = [r[key] for r in runs[(vocab, name)]]
        return statistics.median(v for value in values for v in (value if isinstance(value, list) else [value]))

    for vocab in vocabs:
        for name in names:
            peak, one, every = (median(vocab, name, k) for k in ("peak_mib", "one_thread", "all_cores"))
            first = runs[(vocab, name)][0]
            section.add(vocab, name, peak, peak / median(vocab, MODELOPT, "peak_mib"), first["held_mib"],
                        one, one / median(vocab, MODELOPT, "one_thread"),
                        every, every / median(vocab, MODELOPT, "all_cores"), first["loss"])
    gradient = tokens * max(vocabs) * 2 / 2**20
    section.notes += [
        f"Median of {repeats} processes per row (2 calls each per thread count), the variants taking turns; load "
        f"average {psutil.getloadavg()[0]:.1f} at the end on {cores} cores (other work on the machine slows the "
        "fused loss more: its many block-sized operations each wait for every thread). One thread is what each of "
        "the default two training workers gets on two cores. Peak: resident-set high-water mark of the first call "
        f"above the inputs, the gradient of the logits included ({gradient:,.0f} MiB at {max(vocabs):,}) unless the "
        "loss writes it over the logits, as training's fused loss does where ModelOpt reads its logits no more.",
        "Held for backward: what stays alive until the backward, per TTT step (the fused loss keeps the logits, "
        "ModelOpt keeps its log-softmax and mask * p instead); the target is shared by all steps and not counted.",
        "Target as logits: the base's logits instead of their softmax, which then never exists (one [T, V] tensor "
        "less for the whole forward); ModelOpt's forward makes the softmax before the loss, so training does not "
        "use this yet.",
    ]
    return section


def _cuda_figures(out_dir: Path, tokens: int = TOKENS, vocabs: tuple[int, ...] = VOCABS, repeats: int = 5) -> None:
    """`make gpu-check`: the same comparison on the GPU (Triton and the twin), in one process, to OUT/loss_kernel.*"""
    variants = _variants("cuda")
    rows = []
    for vocab in vocabs:
        inputs = _inputs(tokens, vocab, "cuda")
        z, logits = inputs["z"], inputs["z"].detach().clone()  # values put back before each call (as on CPU)
        reference = None
        for name, (target_kind, loss_fn) in variants.items():
            times = []
            for _ in range(repeats + 1):  # the first compiles the kernels and warms the allocator
                z.grad = None
                with torch.no_grad():
                    z.copy_(logits)
                args = (inputs[target_kind], inputs["token"], z.view_as(z), inputs["mask"])
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                started = time.perf_counter()
                loss, _ = loss_fn(*args)
                loss.backward()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
                peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            z.grad = None
            with torch.no_grad():
                z.copy_(logits)
            held = _held_for_backward_mib(loss_fn, (inputs[target_kind], inputs["token"], z.view_as(z),
                                                    inputs["mask"]), inputs[target_kind])
            reference = reference or {"peak": peak, "seconds": statistics.median(times[1:])}
            seconds = statistics.median(times[1:])
            rows.append({"vocab": vocab, "loss": name, "peak_mib": peak, "peak_ratio": peak / reference["peak"],
                         "held_mib": held, "seconds": seconds, "time_ratio": seconds / reference["seconds"],
                         "loss_value": loss.item()})
        del inputs
        torch.cuda.empty_cache()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "loss_kernel.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(0), "tokens": tokens, "rows": rows}, indent=2))
    lines = [f"# EAGLE loss on {torch.cuda.get_device_name(0)}: {tokens} tokens, bf16, median of {repeats}", "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |"
              for row in rows]
    (out_dir / "loss_kernel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    """The processes this module starts: `--case JSON` (one CPU measurement, printed as JSON; the table itself is
    `python -m jobs.bench --recipe tiny-eagle3 --only loss-kernel`) or `--cuda-out DIR` (gpu-check's figures)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--case", help="JSON {variant, tokens, vocab}: one CPU measurement, printed as JSON")
    mode.add_argument("--cuda-out", type=Path, help="measure on the GPU; write loss_kernel.md and .json here")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure_cpu(**json.loads(args.case))))
    else:
        _cuda_figures(args.cuda_out)


if __name__ == "__main__":
    main()
