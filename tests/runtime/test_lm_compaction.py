"""The `gqa_inplace` KV layout (export/lm/gqa.py, runtime/responder/compact.py): the tiny llama
bundle's attention is one GroupQueryAttention per layer writing its rows in place; past the
window the runtime compacts the buffers. Checked against transformers given the explicit 4-D
sink + window mask built here, through several compactions and a rollback after one; and a
manifest naming a KV layout the runtime does not know is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch


def _reference(folder: Path, ids: list[int], sinks: int, window: int) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    n = len(ids)
    mask = torch.full((1, 1, n, n), torch.finfo(torch.float32).min)
    for q in range(n):
        for k in range(q + 1):
            if k < sinks or k > q - window:
                mask[0, 0, q, k] = 0.0
    with torch.no_grad():
        return model(torch.tensor([ids]), attention_mask=mask).logits[0].numpy()


def test_bundle_uses_group_query_attention(tiny_llama_bundle: Path) -> None:
    import onnx

    m = json.loads((tiny_llama_bundle / "manifest.json").read_text())
    assert m["extra"]["lm"]["kv_layout"] == "gqa_inplace"
    ops = [n.op_type for n in onnx.load(str(tiny_llama_bundle / "lm.onnx"),
                                        load_external_data=False).graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops
    assert "RotaryEmbedding" not in ops  # rotary inside GQA, at position_ids


def test_compaction_past_the_window_matches_transformers(tiny_llama_dir: Path,
                                                         tiny_llama_bundle: Path) -> None:
    """220 tokens through 64 slots, fed as a conversation feeds them (chunks, single steps),
    3 sinks and a rollback margin: several compactions, every logit equal to transformers with
    the same mask; then a rollback of a few tokens after a compaction is exact."""
    from edgestream.runtime.responder.engine import LMEngine
    from edgestream.runtime.responder.lm import load_lm

    lm = load_lm(tiny_llama_bundle, provider="cpu")
    ids = np.random.default_rng(11).integers(10, 49000, 220).tolist()
    engine = LMEngine(lm, pinned=3, margin=8)
    w = engine.kv.window
    parts, i, n = [], 0, 0
    while i < len(ids):
        size = 8 if n % 3 else 1
        parts.append(engine.feed(ids[i:i + size], all_logits=True))
        i, n = i + size, n + 1
    ours = np.concatenate(parts)
    assert engine.kv.compactions >= 3 and engine.kv.size == 64
    assert list(engine.kv.slot_pos[:3]) == [0, 1, 2]  # sinks kept in their slots
    ref = _reference(tiny_llama_dir, ids, 3, w)
    assert np.abs(ours - ref).max() < 1e-3
    # the mask matters: without the window the late positions differ
    full = _reference(tiny_llama_dir, ids, 0, len(ids) + 1)
    assert np.abs(ours[w + 5:] - full[w + 5:]).max() > 1e-2
    # back 6 tokens (within the margin) and a different continuation: exact
    assert engine.rollback(len(ids) - 6)
    other = ids[:-6] + np.random.default_rng(12).integers(10, 49000, 6).tolist()
    again = engine.feed(other[-6:], all_logits=True)
    assert np.abs(again - _reference(tiny_llama_dir, other, 3, w)[-6:]).max() < 1e-3


def test_unknown_kv_layout_is_refused(tiny_llama_bundle: Path, tmp_path: Path) -> None:
    from edgestream.runtime.errors import BundleError
    from edgestream.runtime.responder.lm import load_lm

    bundle = tmp_path / "future"
    shutil.copytree(tiny_llama_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    m["extra"]["lm"]["kv_layout"] = "paged_blocks"
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="kv_layout 'paged_blocks' is not a KV layout"):
        load_lm(bundle, provider="cpu")
