"""Decoder-LM export: tiny random llama and qwen3 exported through the real command path and
checked against transformers (generate, piecewise prefill, ring wrap with the same explicit 4-D
mask, rollback), plus the bad inputs."""

from __future__ import annotations

import hashlib
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
    assert w == 64 - 2 + 1 - getattr(engine.kv, "slack", 0)  # compaction keeps slots free
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
    # the shipped candidate brought its own weights file, hashed in the manifest; no fp32 left
    files = sorted(p.name for p in (tmp_path / "bundle").iterdir())
    assert files == ["lm.onnx", "lm.onnx.data", "manifest.json", "tokenizer.json"]
    data = tmp_path / "bundle" / "lm.onnx.data"
    assert m["graphs"][0]["external_data"] == [{"file": "lm.onnx.data",
                                                "sha256": hashlib.sha256(data.read_bytes())
                                                .hexdigest()}]
    assert acc[acc["chosen"]]["bytes"] == sum(
        (tmp_path / "bundle" / f).stat().st_size for f in ("lm.onnx", "lm.onnx.data"))


def test_lm_weights_live_in_hashed_external_data(tiny_llama_bundle: Path, tmp_path: Path) -> None:
    """Weights go to lm.onnx.data (faster MatMulNBits, graphs over 2 GB); the manifest pins the
    file and load_lm refuses a changed or missing one, naming it."""
    import shutil

    import onnx

    from edgestream.runtime.errors import BundleError
    from edgestream.runtime.responder.lm import load_lm

    model = onnx.load(str(tiny_llama_bundle / "lm.onnx"), load_external_data=False)
    big = [i for i in model.graph.initializer if np.prod(i.dims) * 4 > 4096]
    assert big and all(i.data_location == onnx.TensorProto.EXTERNAL for i in big)
    m = json.loads((tiny_llama_bundle / "manifest.json").read_text())
    data = tiny_llama_bundle / "lm.onnx.data"
    for g in m["graphs"]:
        assert g["external_data"] == [{"file": "lm.onnx.data", "sha256": hashlib.sha256(
            data.read_bytes()).hexdigest()}]
    assert (tiny_llama_bundle / "lm.onnx").stat().st_size < data.stat().st_size / 10
    # readable by whoever may read the graph (onnx itself creates the data file 0600)
    assert data.stat().st_mode & 0o777 == (tiny_llama_bundle / "lm.onnx").stat().st_mode & 0o777
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_bundle, copy)
    with (copy / "lm.onnx.data").open("r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BundleError, match=r"lm\.onnx\.data.*external_data\[0\]"):
        load_lm(copy, provider="cpu")
    (copy / "lm.onnx.data").unlink()
    with pytest.raises(BundleError, match=r"lm\.onnx\.data.*is missing"):
        load_lm(copy, provider="cpu")


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


def test_slot_axis_grows_in_buckets_with_the_same_logits(tiny_chat_bundle: Path) -> None:
    """The slot axis is symbolic: an early conversation runs at a small bucket and the buffers
    grow as it goes on; every logit equals the same run at the full static capacity."""
    import dataclasses

    import onnx

    from edgestream.runtime.responder.engine import LMEngine
    from edgestream.runtime.responder.lm import load_lm

    m = json.loads((tiny_chat_bundle / "manifest.json").read_text())
    assert m["extra"]["lm"]["kv_buckets"] == [32, 64, 128, 256]
    graph = onnx.load(str(tiny_chat_bundle / "lm.onnx"), load_external_data=False).graph
    k0 = next(i for i in graph.input if i.name == "k_0").type.tensor_type.shape.dim
    assert k0[2].dim_param and not k0[2].HasField("dim_value")  # symbolic in the file
    lm = load_lm(tiny_chat_bundle, provider="cpu")
    full = dataclasses.replace(lm, spec=dataclasses.replace(lm.spec, kv_buckets=(256,)))
    ids = np.random.default_rng(5).integers(10, 49000, 150).tolist()
    grown, static = LMEngine(lm, pinned=4), LMEngine(full, pinned=4)
    sizes, diffs = [], []
    for i in range(0, 100, 10):  # prefill in pieces, then single steps
        diffs.append(np.abs(grown.feed(ids[i:i + 10], all_logits=True) -
                            static.feed(ids[i:i + 10], all_logits=True)).max())
        sizes.append(grown.kv.size)
    for t in ids[100:]:
        diffs.append(np.abs(grown.feed([t]) - static.feed([t])).max())
    assert sizes[0] == 32 and sizes[3] == 64 and sizes[-1] == 128 and grown.kv.size == 256
    assert static.kv.size == 256 and max(diffs) < 1e-4
    # a rollback after growth keeps the grown buffers and stays exact
    assert grown.rollback(120) and static.rollback(120)
    np.testing.assert_allclose(grown.feed(ids[120:130]), static.feed(ids[120:130]), atol=1e-4)


def test_reserve_grows_before_the_reply_steps(tiny_chat_bundle: Path) -> None:
    """`reserve` makes the room for a reply while the person talks: the reply's steps then run
    without a growth, re-bound to the grown buffers, with the logits of an engine that grows
    during them; a reserve past the capacity stops at it."""
    from edgestream.runtime.responder.engine import LMEngine
    from edgestream.runtime.responder.lm import load_lm

    lm = load_lm(tiny_chat_bundle, provider="cpu")
    ids = np.random.default_rng(7).integers(10, 49000, 60).tolist()
    ahead, late = LMEngine(lm, pinned=4), LMEngine(lm, pinned=4)
    ahead.feed(ids[:20])
    late.feed(ids[:20])
    assert ahead.kv.size == late.kv.size == 32
    ahead.reserve(40)  # 60 positions: the 64-slot bucket, before any step
    assert ahead.kv.size == 64
    sizes, diffs = [], []
    for t in ids[20:]:
        diffs.append(float(np.abs(ahead.feed([t]) - late.feed([t])).max()))
        sizes.append(ahead.kv.size)
    assert set(sizes) == {64} and late.kv.size == 64 and max(diffs) < 1e-4
    ahead.reserve(10_000)
    assert ahead.kv.size == 256  # the bundle's capacity
