"""Decoder-LM export: tiny random llama and qwen3 exported through the real command path and
checked against transformers (generate, piecewise prefill, ring wrap with the same explicit 4-D
mask, rollback), plus the bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_models import build_tiny_lm, export_tiny_lm


def _hf(folder: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(folder)


def test_llama_bundle_parity_report(tiny_llama_bundle: Path) -> None:
    m = json.loads((tiny_llama_bundle / "manifest.json").read_text())
    assert m["pipeline"] == "decoder_lm" and m["family"] == "llama"
    assert [g["name"] for g in m["graphs"]] == ["step", "chunk"]
    assert m["graphs"][0]["file"] == m["graphs"][1]["file"] == "lm.onnx"  # weights once
    assert not m.get("vad")
    r = m["parity"]
    assert r["passed"] and r["identical_prompts"] == len(r["generate"]) == 3
    assert all(g["tokens"] == 32 for g in r["generate"])  # 32 new tokens, no early stop
    assert r["ring"]["tokens"] > r["ring"]["kv_slots"]  # the ring really wrapped
    assert r["pieces"]["identical_tokens"] and r["pieces"]["rollbacks"] >= 1
    assert r["rollback"]["exact"] and r["max_logit_diff"] < 1e-3
    chat = m["extra"]["lm"]["chat"]
    assert chat["after_user"].endswith("<|im_start|>assistant\n")


def test_ring_wrap_matches_transformers_own_mask(tiny_llama_dir: Path,
                                                 tiny_llama_bundle: Path) -> None:
    """Independent of the parity module: feed 150 tokens one chunk at a time through the
    runtime engine with 2 sinks; transformers gets the sink + sliding-window mask built here."""
    from edgestream.runtime.responder.engine import LMEngine
    from edgestream.runtime.responder.lm import load_lm

    model, _ = _hf(tiny_llama_dir)
    lm = load_lm(tiny_llama_bundle, provider="cpu")
    ids = np.random.default_rng(3).integers(10, 49000, 150).tolist()
    engine = LMEngine(lm, pinned=2)
    w = engine.kv.window
    assert w == 64 - 2 + 1
    ours = np.concatenate([engine.feed(ids[i:i + 8], all_logits=True)
                           for i in range(0, len(ids), 8)])
    n = len(ids)
    mask = torch.full((1, 1, n, n), torch.finfo(torch.float32).min)
    for q in range(n):
        for k in range(q + 1):
            if k < 2 or k > q - w:
                mask[0, 0, q, k] = 0.0
    with torch.no_grad():
        ref = model(torch.tensor([ids]), attention_mask=mask).logits[0].numpy()
        full = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - ref).max() < 1e-3
    # the mask matters: without it (full attention) the late positions differ
    assert np.abs(ours[w + 5:] - full[w + 5:]).max() > 1e-2


def test_step_and_chunk_agree_with_generate(tiny_llama_dir: Path, tiny_llama_bundle: Path
                                            ) -> None:
    """A prompt fed one token at a time, then greedy: the same tokens as transformers."""
    from edgestream.runtime.responder.engine import LMEngine
    from edgestream.runtime.responder.lm import load_lm

    model, tok = _hf(tiny_llama_dir)
    lm = load_lm(tiny_llama_bundle, provider="cpu")
    ids = tok.apply_chat_template([{"role": "user", "content": "Good morning!"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    engine = LMEngine(lm)
    for t in ids[:-1]:
        engine.feed([t])
    ours = engine.greedy(engine.feed([ids[-1]]), 20)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                             pad_token_id=2)[0, len(ids):].tolist()
    ref = ref[: ref.index(2)] if 2 in ref else ref
    assert ours == ref and len(ours) > 5
    assert engine.passes["step"] >= len(ids)


def test_qwen3_export_with_int4_gate(tmp_path: Path) -> None:
    folder = build_tiny_lm(tmp_path / "tiny-qwen3", "qwen3", seed=1)
    report = export_tiny_lm(folder, tmp_path / "bundle", precision="auto")
    assert report["passed"] and report["identical_prompts"] == 3
    m = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    acc = m["accuracy"]
    assert acc["chosen"] in ("int4", "int8")
    assert acc[acc["chosen"]]["agreement"] >= 0.9 and acc[acc["chosen"]]["passed"]
    assert {g["precision"] for g in m["graphs"]} == {acc["chosen"]}
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "bundle" / "lm.onnx")).graph.node}
    assert "MatMulNBits" in ops


def test_tokenizer_without_chat_template_is_refused(tmp_path: Path) -> None:
    from edgestream.export.errors import ExportError

    folder = build_tiny_lm(tmp_path / "plain", "llama", chat_template=False)
    with pytest.raises(ExportError, match="no chat template"):
        export_tiny_lm(folder, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_unknown_lm_family_is_refused(tmp_path: Path) -> None:
    from edgestream.export.build import ExportOptions, export_bundle
    from edgestream.export.errors import ExportError

    folder = tmp_path / "gpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ExportError, match="gpt_neox.*no export recipe"):
        export_bundle(ExportOptions(str(folder), tmp_path / "out"))


def test_lfm2_short_conv_export_and_rollback(tmp_path: Path) -> None:
    """LFM2 (short-conv carries beside attention): parity passes (generate, pieces with a
    revision, ring wrap, rollback by snapshot + re-feed); the carries are `replace` states."""
    folder = build_tiny_lm(tmp_path / "tiny-lfm2", "lfm2", seed=2)
    report = export_tiny_lm(folder, tmp_path / "bundle")
    assert report["passed"] and report["identical_prompts"] == 3, report
    assert report["rollback"]["exact"] and report["pieces"]["identical_tokens"]
    m = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    conv = [s for s in m["states"] if s["name"].startswith("conv_")]
    assert len(conv) == 2 and all(s["update"] == "replace" for s in conv)
    assert len(m["extra"]["lm"]["attention_layers"]) == 2
