"""Offline EAGLE training's feature store on a tiny random Llama: the stored states give the online loss, float8
keeps them close at about half the bytes, and a store that does not fit the draft or the data is refused."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from draftsmith.draft.convert import convert_base
from draftsmith.draft.algorithms import draft_forward
from draftsmith.recipe.loader import load_recipe
from draftsmith.recipe.schema import DraftSettings
from draftsmith.training.base_features import (FeatureLayout, FeatureReader, FeatureStoreError, FeatureStoreManifest,
                                               base_states, check_store_fits, compute_part, compute_parts,
                                               decode, encode, model_layout)
from draftsmith.training.batching import collate

SIZES = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, max_position_embeddings=256)
LENGTHS = [24, 17, 31, 9]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=False)).save_pretrained(folder)
    return str(folder)


def _converted(base_dir: str, algorithm: str):
    model = convert_base(base_dir, DraftSettings.model_validate({"algorithm": algorithm}))
    model.train()  # ModelOpt unrolls every TTT step only in training mode
    return model


def _rows() -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i, n in enumerate(LENGTHS):
        mask = np.zeros(n, np.int64)
        mask[n // 3:] = 1
        rows.append({"source": f"conversations.jsonl:{i + 1}", "input_ids": rng.integers(3, 300, n).tolist(),
                     "target_mask": mask.tolist()})
    return rows


def _write_part(folder, rows) -> str:
    path = folder / "part-0.parquet"
    pq.write_table(pa.Table.from_pylist([{"source": r["source"], "input_ids": r["input_ids"]} for r in rows]), path)
    return path


@pytest.mark.parametrize("algorithm", ["eagle3", "eagle1"])
def test_offline_forward_gives_the_online_loss(base_dir, algorithm):
    """The base's states handed to ModelOpt's offline forward give the same loss, accuracies and gradients as the
    online forward that computes them itself."""
    model = _converted(base_dir, algorithm)
    aux, hidden = model_layout(model, algorithm)
    assert bool(aux) == (algorithm == "eagle3") and hidden == 64  # EAGLE-1 reads the final state alone
    batch = collate(_rows(), pad_id=0)
    online_loss, online_acc = draft_forward(model, batch, algorithm)
    online_loss.backward()
    online_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    layout = FeatureLayout(aux, hidden, "bfloat16")
    states = base_states(model, batch["input_ids"], batch["attention_mask"], layout)
    assert states.shape == (*batch["input_ids"].shape, layout.segments * hidden)
    offline_loss, offline_acc = draft_forward(model, {**batch, "base_features": states}, algorithm)
    offline_loss.backward()
    assert not model.eagle_offline  # the switch is for the one call
    torch.testing.assert_close(offline_loss, online_loss)
    assert offline_acc == online_acc
    assert online_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in online_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


def test_dflash_offline_forward_gives_the_online_loss(base_dir):
    """DFlash reads its target layers' stored outputs (and the final state for the distillation target): the same
    loss, accuracy and gradients as online, on a batch not a multiple of the block size (padded inside)."""
    model = convert_base(base_dir, DraftSettings.model_validate({"algorithm": "dflash", "dflash": {"num_layers": 2}}))
    model.train()
    aux, hidden = model_layout(model, "dflash")
    assert aux == (0, 2)  # two distinct layers, never the base's last (3)
    batch = {k: v[:, :-1] for k, v in collate(_rows(), pad_id=0).items()}  # 31 positions: not whole blocks of 4
    assert batch["input_ids"].shape[1] % 4
    torch.manual_seed(5)  # the same sampled blocks both times
    online_loss, online_acc = draft_forward(model, batch, "dflash")
    online_loss.backward()
    online_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    states = base_states(model, batch["input_ids"], batch["attention_mask"], FeatureLayout(aux, hidden, "bfloat16"))
    torch.manual_seed(5)
    offline_loss, offline_acc = draft_forward(model, {**batch, "base_features": states}, "dflash")
    offline_loss.backward()
    assert not model.dflash_offline and offline_acc == online_acc
    torch.testing.assert_close(offline_loss, online_loss)
    for name, grad in online_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float8"])
def test_store_round_trip_by_source(base_dir, tmp_path, dtype):
    """A dataset part's features written by `compute_part` come back per conversation, in the base's values (to
    the storage dtype's precision), zero-padded in a batch, at the stated bytes per token; training from them
    gives the online loss to within that precision."""
    model = _converted(base_dir, "eagle3")
    aux, hidden = model_layout(model, "eagle3")
    layout = FeatureLayout(aux, hidden, dtype)
    rows = _rows()
    part = _write_part(tmp_path, rows)
    (tmp_path / "store" / "train").mkdir(parents=True)
    out = tmp_path / "store" / "train" / "part-0.safetensors"
    assert compute_part(model, part, out, layout, pad_id=0) == sum(LENGTHS)
    _write_manifest(tmp_path / "store", list(aux), hidden, dtype)
    stored_bytes = out.stat().st_size
    # A re-run (a killed job's) keeps the parts already written: no model is even loaded for them.
    again = compute_parts({"part": [str(part)], "out": [str(out)]}, base_dir="/nonexistent", layout={
        "aux_layer_ids": list(aux), "hidden_size": hidden, "dtype": dtype}, dtype="float32", pad_id=0, workers=1,
        device="cpu")
    assert again["tokens"] == [sum(LENGTHS)] and out.stat().st_size == stored_bytes
    assert layout.bytes_per_token * sum(LENGTHS) <= stored_bytes < layout.bytes_per_token * sum(LENGTHS) + 4096

    reader = FeatureReader(tmp_path / "store", "train", torch.float32)
    batch = collate(rows, pad_id=0)
    whole = base_states(model, batch["input_ids"], batch["attention_mask"], layout)
    tolerance = 0.01 if dtype == "bfloat16" else 0.05
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert reader.num_tokens(row["source"]) == n
        got, want = reader.get(row["source"]), whole[i, :n]
        assert float((got - want).norm() / want.norm()) < tolerance
    assert reader.num_tokens("elsewhere.jsonl:1") is None
    padded = reader.batch([r["source"] for r in rows], width=batch["input_ids"].shape[1])
    assert padded.shape == whole.shape and not padded[1, LENGTHS[1]:].any()

    online, _ = draft_forward(model, batch, "eagle3")
    offline, _ = draft_forward(model, {**batch, "base_features": padded}, "eagle3")
    assert abs(float(offline) - float(online)) < 0.02 * float(online)


def test_float8_keeps_outlier_channels_apart():
    """A scale per token and segment: one huge channel (the base's outlier dimensions) does not flush the other
    segments' small values to zero, and the encoding is half of bfloat16's bytes plus the scales."""
    layout = FeatureLayout((1, 2), 8, "float8")
    values = torch.randn(5, layout.segments * 8)
    values[:, 0] = 3000.0  # an outlier channel in the first segment
    stored = encode(values, layout)
    assert stored["features"].dtype == torch.float8_e4m3fn and stored["scales"].shape == (5, 3)
    back = decode(stored["features"], stored["scales"], layout, torch.float32)
    later = slice(8, None)  # the segments without the outlier keep their values
    assert float((back[:, later] - values[:, later]).norm() / values[:, later].norm()) < 0.05
    assert layout.bytes_per_token == 3 * 8 + 4 * 3 and FeatureLayout((1, 2), 8, "bfloat16").bytes_per_token == 48


def _write_manifest(store, aux: list[int], hidden: int, dtype: str) -> None:
    (store / "features.json").write_text(FeatureStoreManifest(
        aux_layer_ids=aux, hidden_size=hidden, dtype=dtype, compute_dtype="float32", parts=1, tokens=0, bytes=0,
        bytes_per_token=0.0, bytes_per_token_bfloat16=0, bytes_per_token_float32=0, compute_seconds=0.0,
        wall_seconds=0.0).model_dump_json())


def test_a_store_for_another_draft_or_other_data_is_refused(tmp_path):
    _write_manifest(tmp_path, [1, 2], 64, "bfloat16")
    check_store_fits(tmp_path, ((1, 2), 64))
    with pytest.raises(FeatureStoreError, match=r"aux layers \[1, 2\].*reads aux layers \[0, 1, 2\]"):
        check_store_fits(tmp_path, ((0, 1, 2), 64))
    with pytest.raises(FeatureStoreError, match="not a finished feature store"):
        check_store_fits(tmp_path / "nowhere", ((1, 2), 64))
    (tmp_path / "features.json").write_text('{"format": "something/0"}')
    with pytest.raises(FeatureStoreError, match="expected 'draftsmith-base-features/1'"):
        check_store_fits(tmp_path, ((1, 2), 64))
    (tmp_path / "features.json").write_text(
        '{"format": "draftsmith-base-features/1", "aux_layer_ids": [1, 2], "hidden_size": 64, "dtype": "bfloat16"}')
    with pytest.raises(FeatureStoreError, match="key 'compute_dtype'"):  # an older layout: the key is named
        check_store_fits(tmp_path, ((1, 2), 64))


def test_recipe_offline_features_need_an_eagle_draft():
    with pytest.raises(ValueError, match="training.base_features=offline .* draft.algorithm=medusa"):
        load_recipe("tiny-eagle3", ["training.base_features=offline", "draft.algorithm=medusa"])
    recipe = load_recipe("tiny-eagle3", ["training.base_features=offline", "training.feature_dtype=float8"])
    assert recipe.training.feature_dtype == "float8"
