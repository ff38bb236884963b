"""kernels/: the soft-target cross-entropy twin against ModelOpt's EAGLE loss expression (float64, odd sizes, empty
and all-zero masks, bf16), the Triton kernel against the twin (interpreted on CPU; compiled on CUDA under `gpu`),
and the fused loss wired into EAGLE training through the checked override of ModelOpt's `_eagle_loss`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kernels import soft_target_cross_entropy
from kernels import soft_target_ce_twin as twin
from kernels.soft_target_ce import _SoftTargetCrossEntropy

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def modelopt_loss(p: torch.Tensor, z: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """The loss lines of ModelOpt 0.47's `HFEagleModel._eagle_loss`, verbatim (test_override_check holds the
    installed method to the source they come from)."""
    loss_mask = loss_mask[:, : z.shape[1], None]
    eagle_logsoft = torch.log_softmax(z, dim=2)
    return -torch.sum(torch.sum(loss_mask * p * eagle_logsoft, 2)) / (loss_mask.sum() + 1e-5)


def _inputs(batch: int, rows: int, vocab: int, dtype: torch.dtype, *, seed: int = 0, strided: bool = True):
    """Logits, target logits and probabilities [B, T, V] as ModelOpt slices them per TTT step (rows of a longer
    sequence: strided views), and a 0/1 integer mask with empty rows."""
    gen = torch.Generator().manual_seed(seed)
    extra = 2 if strided else 0
    z = (4 * torch.randn(batch, rows + extra, vocab, generator=gen, dtype=torch.float64)).to(dtype)
    x = (4 * torch.randn(batch, rows + extra, vocab, generator=gen, dtype=torch.float64)).to(dtype)
    z, x = z[:, extra // 2: rows + extra // 2], x[:, extra:]
    p = torch.softmax(x.double(), dim=-1).to(dtype)
    mask = (torch.rand(batch, rows, generator=gen) > 0.3).long()
    mask[0, : rows // 3] = 0  # a run of prompt/padding positions
    return z.requires_grad_(), x, p, mask


@pytest.mark.parametrize("shape", [(1, 37, 1001), (2, 37, 1001), (3, 5, 2)])
@pytest.mark.parametrize("mask_kind", ["random", "all_zero", "all_one"])
def test_twin_equals_modelopt_loss_and_gradient_in_float64(shape, mask_kind):
    z, x, p, mask = _inputs(*shape, torch.float64)
    if mask_kind != "random":
        mask = torch.full_like(mask, int(mask_kind == "all_one"))
    expected = modelopt_loss(p, z, mask)
    (expected_grad,) = torch.autograd.grad(expected, z)
    for target, as_logits in ((p, False), (x, True)):
        loss = soft_target_cross_entropy(z, target, mask, target_is_logits=as_logits)
        (grad,) = torch.autograd.grad(loss, z)
        assert loss.dtype == torch.float64 and torch.isfinite(loss)
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-13)
    if mask_kind == "all_zero":
        assert loss.item() == 0 and not grad.any()


def test_twin_in_bf16_matches_float64_better_than_modelopt_in_bf16():
    """bf16 inputs: the twin accumulates in float32, so it stays within float32 rounding of the float64 loss of the
    same bf16 values, closer than ModelOpt's bf16 expression; the gradient is the float64 one rounded to bf16."""
    z, x, p, mask = _inputs(2, 37, 1001, torch.bfloat16)
    reference = modelopt_loss(p.double(), z.detach().double().requires_grad_(), mask)
    z64 = z.detach().double().requires_grad_()
    (reference_grad,) = torch.autograd.grad(modelopt_loss(p.double(), z64, mask), z64)
    loss = soft_target_cross_entropy(z, p, mask)
    (grad,) = torch.autograd.grad(loss, z)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16  # ModelOpt's loss is float32 here too
    assert abs(loss.item() - reference.item()) < 1e-5 * reference.item()
    assert abs(loss.item() - reference.item()) <= abs(modelopt_loss(p, z, mask).item() - reference.item())
    torch.testing.assert_close(grad.double(), reference_grad, rtol=1e-2, atol=1e-6)
    from_logits = soft_target_cross_entropy(z, x, mask, target_is_logits=True)
    assert abs(from_logits.item() - reference.item()) < 2e-3 * reference.item()  # p was rounded to bf16 above


@pytest.mark.parametrize("as_logits", [False, True])
def test_gradient_written_over_the_logits_is_the_gradient(as_logits):
    """`grad_in_logits`: the backward leaves the gradient in the logits' own storage (rows of a longer sequence, as
    ModelOpt slices them per TTT step, the other rows untouched) and hands that on: what reaches the tensor the
    logits came from equals the ordinary gradient."""
    z, x, p, mask = _inputs(2, 37, 1001, torch.float32)
    target = x if as_logits else p
    (expected,) = torch.autograd.grad(soft_target_cross_entropy(z, target, mask, target_is_logits=as_logits), z)
    hidden = z._base.detach().clone().requires_grad_()  # the [B, T + 2, V] sequence z's rows are a view of
    sequence = hidden * 1.0  # a non-leaf, as the draft's lm_head output is
    before = sequence.detach().clone()
    loss = soft_target_cross_entropy(sequence[:, 1:-1], target, mask, target_is_logits=as_logits,
                                     grad_in_logits=True)
    loss.backward()
    torch.testing.assert_close(sequence.detach()[:, 1:-1], expected, rtol=1e-6, atol=1e-9)  # written in place
    assert torch.equal(sequence.detach()[:, [0, -1]], before[:, [0, -1]])
    torch.testing.assert_close(hidden.grad[:, 1:-1], expected, rtol=1e-6, atol=1e-9)
    assert not hidden.grad[:, [0, -1]].any()


def test_twin_keeps_no_vocabulary_sized_tensor_for_backward():
    """Saved for the backward: the inputs themselves and a few floats a row, nothing [rows, vocab] new."""
    z, _, p, mask = _inputs(2, 37, 1001, torch.float32)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        soft_target_cross_entropy(z, p, mask)
    inputs = {z.untyped_storage().data_ptr(), p.untyped_storage().data_ptr()}
    new = [t for t in saved if t.untyped_storage().data_ptr() not in inputs]
    assert sum(t.numel() for t in new) <= 8 * 2 * 37, [tuple(t.shape) for t in new]


def test_bad_inputs_are_refused_with_the_shapes():
    z, _, p, mask = _inputs(2, 5, 11, torch.float32)
    with pytest.raises(ValueError, match=r"loss_mask shape \(2, 4\)"):
        soft_target_cross_entropy(z, p, mask[:, :4])
    with pytest.raises(ValueError, match="target shape"):
        soft_target_cross_entropy(z, p[:, :, :10], mask)
    with pytest.raises(ValueError, match="no gradient"):
        soft_target_cross_entropy(z, p.clone().requires_grad_(), mask)
    with pytest.raises(ValueError, match="needs CUDA"):
        soft_target_cross_entropy(z, p, mask, impl="triton")


def interpreted_kernel_errors() -> dict[str, list[float]]:
    """Run in a process started with TRITON_INTERPRET=1 (`triton.jit` reads it when it decorates, Triton's own
    library functions too, so it must be set before Triton is first imported): per dtype and target kind, the
    largest differences (loss, gradient, gradient on masked rows) between the kernel and the twin."""
    from kernels import soft_target_ce_triton as kernel

    assert kernel._forward_kernel.__class__.__name__ == "InterpretedFunction", "not running in the interpreter"
    # Blocks of 128 columns: 3 a row, the last one partial, so the online softmax really runs over blocks.
    blocked = SimpleNamespace(forward_stats=partial(kernel.forward_stats, block_v=128),
                              backward_grad=partial(kernel.backward_grad, block_v=128))
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        z, x, p, mask = _inputs(2, 9, 300, dtype, seed=1)
        for as_logits, target in ((False, p), (True, x)):
            results = []
            for backend, in_place in ((blocked, False), (twin, False), (blocked, True)):
                logits = z.detach().clone().requires_grad_() if in_place else z  # the in-place one overwrites
                loss = _SoftTargetCrossEntropy.apply(logits, target, mask.float(), (mask.sum() + 1e-5).float(),
                                                     as_logits, backend, torch.float32, in_place)
                results.append((loss, torch.autograd.grad(2.5 * loss, logits)[0].float()))
            (loss, grad), (expected_loss, expected_grad), (_, in_place_grad) = results
            errors[f"{dtype}-{'logits' if as_logits else 'probabilities'}"] = [
                abs(loss - expected_loss).item() / expected_loss.item(),
                ((grad - expected_grad).abs().max() / expected_grad.abs().max()).item(),
                grad[mask == 0].abs().max().item(), (in_place_grad - grad).abs().max().item()]
    return errors


def test_triton_kernel_equals_twin_in_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed")
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_kernels; "
            "print(json.dumps(test_kernels.interpreted_kernel_errors()))")
    run = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=KERNELS.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(errors) == 4
    for case, (loss, grad, masked, in_place) in errors.items():
        assert loss < 1e-6 and masked == 0 and in_place == 0, (case, loss, masked, in_place)
        assert grad < (1e-6 if "float32" in case else 1e-2), (case, grad)  # bf16: one rounding of the gradient


@pytest.mark.gpu
@pytest.mark.parametrize("as_logits", [False, True])
def test_triton_kernel_equals_twin_on_cuda(as_logits):
    z, x, p, mask = (t.cuda() for t in _inputs(4, 257, 32000, torch.bfloat16, seed=2))
    z = z.detach().requires_grad_()
    target = x if as_logits else p
    results = []
    for impl in ("triton", "torch"):
        loss = soft_target_cross_entropy(z, target, mask, target_is_logits=as_logits, impl=impl)
        results.append((loss, torch.autograd.grad(loss, z)[0]))
    (loss, grad), (expected_loss, expected_grad) = results
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=1e-2, atol=1e-8)
    reference = modelopt_loss(p.double(), z.detach().double(), mask)
    assert abs(loss.item() - reference.item()) < 1e-4 * reference.item()


def test_override_check_passes_here_and_fails_in_one_line_when_modelopt_changes(monkeypatch):
    from draftsmith.draft import fused_loss

    fused_loss.check_modelopt_eagle_loss()  # the installed ModelOpt is the one the override was written against
    source = fused_loss.eagle_loss_source()
    for line in ("eagle_logsoft = torch.log_softmax(eagle_logits, dim=2)",
                 "torch.sum(loss_mask * base_output_softmax_logits * eagle_logsoft, 2)",
                 ") / (loss_mask.sum() + 1e-5)"):
        assert line in source  # what modelopt_loss above transcribes
    monkeypatch.setattr(fused_loss, "EXPECTED_SOURCE_SHA256", "0" * 64)
    with pytest.raises(fused_loss.LossKernelError, match="training.loss_kernel=modelopt") as failure:
        fused_loss.resolve_loss_kernel("auto", "eagle3")
    assert "\n" not in str(failure.value)
    assert fused_loss.resolve_loss_kernel("modelopt", "eagle3") == "modelopt"  # opting out needs no check


def test_loss_kernel_setting_resolves_per_algorithm():
    from draftsmith.draft.fused_loss import resolve_loss_kernel
    from draftsmith.recipe.loader import load_recipe

    assert load_recipe("tiny-eagle3", []).training.loss_kernel == "auto"
    assert resolve_loss_kernel("auto", "eagle3") == resolve_loss_kernel("fused", "eagle1") == "fused"
    assert resolve_loss_kernel("auto", "medusa") == resolve_loss_kernel("auto", "dflash") == "modelopt"
    with pytest.raises(ValueError, match="training.loss_kernel=fused .* draft.algorithm=medusa"):
        load_recipe("tiny-eagle3", ["draft.algorithm=medusa", "training.loss_kernel=fused",
                                    "quantization.format=none"])


def test_fused_loss_follows_modelopt_loss_curve(tmp_path):
    """Four AdamW steps of the same EAGLE-3 draft (reduced vocabulary: the target goes through d2t) with ModelOpt's
    loss and with the fused one: the same losses and accuracies, step by step."""
    import numpy as np
    from transformers import LlamaForCausalLM

    from test_draft_convert import SIZES, _batch, _settings, _tiny_base

    from draftsmith.draft.algorithms import draft_forward
    from draftsmith.draft.convert import convert_base
    from draftsmith.draft.fused_loss import LossKernelError, install_fused_loss
    from draftsmith.draft.vocab import draft_vocabulary

    base_dir = _tiny_base("llama", tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():  # a confident base (a random one is near uniform), so the draft has something to learn
        base.lm_head.weight.mul_(30)
    base.save_pretrained(base_dir)
    d2t = draft_vocabulary(np.arange(SIZES["vocab_size"])[::-1].copy(), 128)[0]
    torch.manual_seed(0)
    batch = _batch()
    curves = []
    for fused in (False, True):
        model = convert_base(base_dir, _settings("eagle3", draft_vocab_size=128), d2t=d2t)
        if fused:
            install_fused_loss(model)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        curve = []
        for _ in range(4):  # the same batch: the draft fits it, so the loss moves
            loss, accuracies = draft_forward(model, batch, "eagle3")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append([loss.item(), *accuracies])
        curves.append(torch.tensor(curve))
    modelopt_curve, fused_curve = curves
    assert modelopt_curve[-1, 0] < 0.9 * modelopt_curve[0, 0]  # it learns, so the curves are worth comparing
    torch.testing.assert_close(fused_curve, modelopt_curve, rtol=1e-5, atol=1e-6)
    with pytest.raises(LossKernelError, match="not ModelOpt's method"):
        install_fused_loss(model)  # already replaced (as torch.compile would have)
