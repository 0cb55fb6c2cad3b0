"""Hybrid decoder LMs (Gated DeltaNet linear attention beside gated full attention, MoE):
tiny random qwen3_5, qwen3_5_moe and qwen3_next exported through the real command path and
checked against transformers. qwen3_5_moe is saved as the vision + text checkpoint its releases
ship (Intern-S2-Preview's layout): the exporter must take its text backbone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_models import HYBRID_FAMILIES, build_tiny_lm, export_tiny_lm


def _hf(folder: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                attn_implementation="eager").eval()


@pytest.fixture(scope="module", params=HYBRID_FAMILIES)
def hybrid(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[str, Path, Path, dict]:
    """(family, model folder, fp32 bundle with 64 KV slots and 8-token chunks, parity report)."""
    family = request.param
    root = tmp_path_factory.mktemp(f"tiny-{family}")
    folder = build_tiny_lm(root / "model", family, seed=4, composite=family == "qwen3_5_moe")
    report = export_tiny_lm(folder, root / "bundle")
    return family, folder, root / "bundle", report


def test_parity_report_and_states(hybrid: tuple[str, Path, Path, dict]) -> None:
    family, folder, bundle, r = hybrid
    assert r["passed"] and r["identical_prompts"] == len(r["generate"]) == 3, r
    assert all(g["tokens"] == 32 and g["template_tokens_identical"] for g in r["generate"])
    assert r["pieces"]["identical_tokens"] and r["pieces"]["rollbacks"] >= 1
    assert r["ring"]["tokens"] > r["ring"]["kv_slots"] and r["ring"]["identical_argmax"]
    assert r["rollback"]["exact"] and r["max_logit_diff"] < 1e-3
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["family"] == family and m["pipeline"] == "decoder_lm"
    if family == "qwen3_5_moe":
        assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen3_5_moe"
    lm = m["extra"]["lm"]
    assert lm["model"]["kinds"] == ["linear_attention", "attention"] * 2
    assert [a["k"] for a in lm["attention_layers"]] == ["k_1", "k_3"]
    assert [s["input"] for s in lm["recurrent_states"]] == ["conv_0", "rec_0", "conv_2", "rec_2"]
    states = {s["name"]: s for s in m["states"]}
    # conv carry: q, k, v channels (2 * 2 * 16 + 4 * 8) x the last kernel-1 = 3 inputs;
    # memory: 4 value heads x key dim 16 x value dim 8, fp32
    assert states["conv_0"]["shape"] == [1, 96, 3] and states["rec_0"]["shape"] == [1, 4, 16, 8]
    assert all(states[n]["update"] == "replace" and states[n]["dtype"] == "float32"
               for n in ("conv_0", "rec_0", "conv_2", "rec_2"))
    assert states["k_1"]["update"] == "append"
    import onnx

    ops = {n.op_type for n in onnx.load(str(bundle / "lm.onnx")).graph.node}
    # static shapes only: no loop over tokens or experts, no data-dependent gather of tokens
    assert not ops & {"Loop", "Scan", "If", "NonZero"}, ops


def test_engine_states_equal_transformers_cache(hybrid: tuple[str, Path, Path, dict]) -> None:
    """Independent of the parity module: 40 tokens fed as chunks and single steps give
    transformers' logits, and the graph's conv carries and fp32 memories equal the tensors in
    transformers' own cache after the same tokens. Then a rollback into the middle of a chunk
    (snapshot restored, tokens re-fed) and a new continuation equal a fresh forward."""
    from edgestream.runtime.responder.engine import LMEngine
    from edgestream.runtime.responder.lm import load_lm

    _, folder, bundle, _ = hybrid
    model = _hf(folder)
    lm = load_lm(bundle, provider="cpu")
    ids = np.random.default_rng(5).integers(10, 49000, 40).tolist()
    engine = LMEngine(lm, margin=16)
    parts, i = [], 0
    for size in (8, 1, 1, 8, 3, 8, 11):
        parts.append(engine.feed(ids[i:i + size], all_logits=True))
        i += size
    assert i == len(ids) and engine.passes["chunk"] >= 4 and engine.passes["step"] >= 3
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
    assert np.abs(np.concatenate(parts) - out.logits[0].numpy()).max() < 1e-3
    cache = out.past_key_values
    for layer in (0, 2):
        rec = cache.layers[layer].recurrent_states[0].numpy()
        conv = cache.layers[layer].conv_states[0].numpy()
        assert np.abs(engine.recurrent[f"rec_{layer}"] - rec).max() < 1e-4
        assert np.abs(engine.recurrent[f"conv_{layer}"] - conv[..., -3:]).max() < 1e-4
    # passes started at 0, 8, 9, 10, 18, 19, 20, 21, 29, 37..39: 14 is inside the chunk at 10
    assert engine.rollback(14)
    other = np.random.default_rng(6).integers(10, 49000, 10).tolist()
    ours = engine.feed(other, all_logits=True)
    with torch.no_grad():
        ref = model(torch.tensor([ids[:14] + other])).logits[0, 14:].numpy()
    assert engine.tokens == ids[:14] + other
    assert np.abs(ours - ref).max() < 1e-3


def test_rollback_past_many_passes(hybrid: tuple[str, Path, Path, dict]) -> None:
    """A speculative reply of more single-token passes than the engine keeps snapshots for,
    then discarded: the rollback still lands (older snapshots are thinned, not dropped) and the
    next logits equal transformers' forward over the kept tokens."""
    from edgestream.runtime.responder.engine import LMEngine
    from edgestream.runtime.responder.lm import load_lm

    _, folder, bundle, _ = hybrid
    lm = load_lm(bundle, provider="cpu")
    ids = np.random.default_rng(8).integers(10, 49000, 60).tolist()
    engine = LMEngine(lm, margin=32)
    engine.SAVED = 8  # few snapshots: 30 reply steps are far more passes than that
    engine.feed(ids[:20])
    mark = engine.mark()
    for t in ids[20:50]:
        engine.feed([t])
    assert len(engine._saved) <= 8
    assert engine.rollback(mark)
    ours = engine.feed(ids[50:], all_logits=True)
    with torch.no_grad():
        ref = _hf(folder)(torch.tensor([ids[:20] + ids[50:]])).logits[0, 20:].numpy()
    assert np.abs(ours - ref).max() < 1e-3


@pytest.mark.parametrize("snapshots", [0, 2])
def test_snapshot_byte_budget_falls_back_to_re_reading(hybrid: tuple[str, Path, Path, dict],
                                                     snapshots: int) -> None:
    """A byte budget of 0 or 2 snapshots (a real qwen3_5's ~60 MB each would not fit 8 on a
    small device): the memory held stays within it, and rolling back past every kept snapshot
    re-reads from the start (zero states) with the same logits as transformers' forward."""
    from edgestream.runtime.responder.engine import LMEngine
    from edgestream.runtime.responder.lm import load_lm

    _, folder, bundle, _ = hybrid
    lm = load_lm(bundle, provider="cpu")
    ids = np.random.default_rng(9).integers(10, 49000, 50).tolist()
    probe = LMEngine(lm)
    one = sum(b.nbytes for b in probe.recurrent.values())
    engine = LMEngine(lm, margin=32, snapshot_bytes=snapshots * one + one // 2)
    assert engine.snapshots_kept == snapshots
    engine.feed(ids[:12])
    mark = engine.mark()
    for t in ids[12:40]:
        engine.feed([t])
    assert len(engine._saved) <= snapshots
    assert sum(b.nbytes for s in engine._saved.values() for b in s.values()) <= \
        engine.snapshot_bytes
    assert engine.rollback(mark)
    assert engine.position == 12
    ours = engine.feed(ids[40:], all_logits=True)
    with torch.no_grad():
        ref = _hf(folder)(torch.tensor([ids[:12] + ids[40:]])).logits[0, 12:].numpy()
    assert np.abs(ours - ref).max() < 1e-3


def test_negative_snapshot_budget_is_refused(hybrid: tuple[str, Path, Path, dict]) -> None:
    from edgestream.runtime.errors import OptionError
    from edgestream.runtime.responder.engine import LMEngine
    from edgestream.runtime.responder.lm import load_lm

    with pytest.raises(OptionError, match="snapshot budget"):
        LMEngine(load_lm(hybrid[2], provider="cpu"), snapshot_bytes=-1)


def test_deltanet_pass_equals_per_token_recurrence() -> None:
    """The exportable pass (one closed-form chunk per pass) against transformers' per-token
    reference, carried across passes of 32, 1 and 5 tokens; also with nearly parallel keys and
    beta near 1, where the within-chunk inverse is furthest from the identity (a finite
    Neumann series for it loses everything to cancellation there)."""
    from transformers.models.qwen3_next.modeling_qwen3_next import \
        torch_recurrent_gated_delta_rule as reference

    from edgestream.export.lm.deltanet import gated_delta_pass

    torch.manual_seed(0)
    for correlated in (False, True):
        q, k = torch.randn(1, 70, 2, 64), torch.randn(1, 70, 2, 64)
        if correlated:
            k = torch.randn(1, 1, 2, 64) + 0.05 * k
        v = torch.randn(1, 70, 4, 8)
        g = -torch.rand(1, 70, 4) * (0.05 if correlated else 2.0)
        beta = torch.rand(1, 70, 4) * 0.02 + 0.98 if correlated else torch.rand(1, 70, 4)
        ref, ref_state = reference(q, k, v, g, beta, initial_state=None, output_final_state=True,
                                   use_qk_l2norm_in_kernel=True)
        state, outs, i = torch.zeros(1, 4, 64, 8), [], 0
        for n in (32, 1, 5, 32):
            o, state = gated_delta_pass(q[:, i:i + n], k[:, i:i + n], v[:, i:i + n],
                                        g[:, i:i + n], beta[:, i:i + n], state, 32)
            outs.append(o)
            i += n
        assert float((torch.cat(outs, 1) - ref).abs().max()) < 1e-4
        assert float((state - ref_state).abs().max()) < 1e-4


def test_unknown_hybrid_layer_type_is_refused(tmp_path: Path) -> None:
    from edgestream.export.errors import ExportError
    from lm_models import tiny_config

    from edgestream.export.lm.families import hybrid_kinds

    cfg = tiny_config("qwen3_next")
    cfg.layer_types = ["linear_attention", "sliding_attention", "linear_attention",
                       "full_attention"]
    with pytest.raises(ExportError, match="sliding_attention"):
        hybrid_kinds(cfg)
