"""Whisper export: bundle layout, static state contract, parity gate (tiny random and real)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgestream.export.build import ExportOptions, export_bundle
from edgestream.export.errors import ExportError, ParityError
from edgestream.runtime.bundle import Bundle
from edgestream.runtime.manifest import load_manifest
from edgestream.runtime.session import SessionConfig
from edgestream.runtime.state import StateStore

BLOCK = 16  # the recipe's default block size (the decoder's second token count)


def test_tiny_bundle_contract(tiny_bundle: Path) -> None:
    m = load_manifest(tiny_bundle)
    assert (m.family, m.pipeline) == ("whisper", "whisper_window")
    assert {g.name for g in m.graphs} == {"encoder", "decoder", "vad"}
    assert m.graph("encoder").inputs[0].shape == (1, 80, 3000)  # Whisper insists on 3000 frames
    self_kv = [s for s in m.states if s.name.startswith("self_")]
    cross_kv = [s for s in m.states if s.name.startswith("cross_")]
    assert len(self_kv) == len(cross_kv) == 4  # k and v per layer, never stacked
    for s in self_kv:  # decoder returns only the new row; the runtime appends it at `position`
        assert (s.update, s.axis, s.shape) == ("append", 2, (1, 4, 64, 16))
        assert m.graph("decoder").output(s.output).shape == (1, 4, "tokens", 16)
    for s in cross_kv:  # filled by the encoder graph, read by the decoder
        assert (s.output_graph, s.graph, s.update) == ("encoder", "decoder", "replace")
    assert m.audio.sample_rate == 16000 and m.audio.window_samples == 480000
    assert m.decoding.prompt == (50257, 50362)
    assert m.tokenizer.special["timestamp_begin"] == 50363
    assert m.parity["passed"] and m.parity["max_logit_diff"] <= 1e-3
    assert m.parity["max_mel_diff"] <= 1e-4
    Bundle.open(tiny_bundle)  # every hash, name and shape checks out


def test_tiny_block_contract(tiny_bundle: Path) -> None:
    """One decoder graph whose token axis is symbolic and declared at exactly 1 and K: the
    decoder weights are in the bundle once (no second graph, no shared buffers between graphs)."""
    import onnx

    m = load_manifest(tiny_bundle)
    step = m.graph("decoder")
    assert m.extra["block_tokens"] == BLOCK and step.dims == {"tokens": (1, BLOCK)}
    assert [(t.name, t.shape) for t in step.inputs[:2]] == [("tokens", (1, "tokens")),
                                                            ("position", (1,))]
    assert step.output("logits").shape == (1, "tokens", 51864)
    assert not any(s.shared_with for s in m.states)
    assert not list(tiny_bundle.glob("decoder_block*"))
    # the vocabulary matrix (51864 x 64) is stored once in the whole bundle
    vocab = [i.name for g in ("encoder", "decoder")
             for i in onnx.load(str(tiny_bundle / f"{g}.onnx")).graph.initializer
             if 51864 in i.dims]
    assert len(vocab) == 1, vocab
    assert m.parity["max_block_logit_diff"] <= 1e-3
    assert all(c["max_block_logit_diff"] <= 1e-3 for c in m.parity["clips"])


def test_tiny_block_then_step_matches_steps(tiny_bundle: Path) -> None:
    """A prefix teacher-forced in one block pass leaves the same cache as stepping it token by
    token: the next step's logits agree. A block overhanging the cache end runs and stays finite."""
    b = Bundle.open(tiny_bundle, SessionConfig("cpu"))
    m = b.manifest
    t_max = m.decoding.max_tokens
    mel = np.random.default_rng(0).standard_normal((1, 80, 3000)).astype(np.float32)
    cross = b.sessions["encoder"].run({"mel": mel})
    prefix = [*m.decoding.prompt, 440, 1332, 995, 13, 3290, 262, 2068]  # 9 tokens
    last = 11

    def stamps(n: int) -> dict[str, np.ndarray]:  # the timestamp head's input, unused here
        return {"timestamp_state": np.zeros((1, n, 2), np.int64)}

    def step(store: StateStore, token: int, pos: int) -> np.ndarray:
        out = b.sessions["decoder"].run({"tokens": np.array([[token]], np.int64),
                                         "position": np.array([pos], np.int64),
                                         **stamps(1), **store.feeds("decoder")})
        store.update("decoder", out, pos)
        return out["logits"][0, 0]

    stepped, blocked = StateStore(m), StateStore(m)
    for store in (stepped, blocked):
        store.update("encoder", cross)
    by_step = [step(stepped, t, i) for i, t in enumerate(prefix)]
    out = b.sessions["decoder"].run(
        {"tokens": np.array([prefix + [0] * (BLOCK - len(prefix))], np.int64),
         "position": np.array([0], np.int64), **stamps(BLOCK), **blocked.feeds("decoder")})
    blocked.update("decoder", out, 0)
    np.testing.assert_allclose(out["logits"][0, :len(prefix)], np.stack(by_step), atol=1e-4)
    np.testing.assert_allclose(step(blocked, last, len(prefix)), step(stepped, last, len(prefix)),
                               atol=1e-4)
    # positions t_max - 3 .. t_max + 12: embedding index clamped, rows past the end dropped
    out = b.sessions["decoder"].run(
        {"tokens": np.full((1, BLOCK), last, np.int64), "position": np.array([t_max - 3], np.int64),
         **stamps(BLOCK), **blocked.feeds("decoder")})
    assert np.isfinite(out["logits"]).all()
    blocked.update("decoder", out, t_max - 3)
    np.testing.assert_array_equal(blocked.buffers["self_k_0"][:, :, t_max - 3:],
                                  out["new_self_k_0"][:, :, :3])


def test_failed_parity_fails_the_export(tiny_whisper_dir: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from edgestream.export.whisper import graphs as whisper_graphs

    original = whisper_graphs.WhisperDecoderStep.forward

    def skewed(self, *args):  # a subtly wrong export: every logit off by 0.01
        logits, *rows = original(self, *args)
        return (logits + 0.01, *rows)

    monkeypatch.setattr(whisper_graphs.WhisperDecoderStep, "forward", skewed)
    out = tmp_path / "bad"
    with pytest.raises(ParityError) as err:
        export_bundle(ExportOptions(str(tiny_whisper_dir), out, vad="none"))
    assert not err.value.report["passed"]
    assert err.value.report["max_logit_diff"] == pytest.approx(0.01, rel=0.05)
    assert err.value.report["max_block_logit_diff"] == pytest.approx(0.01, rel=0.05)
    assert not out.exists(), "a bundle that failed parity must not be written"
    assert not list(tmp_path.glob(".bad.*")), "the temporary export folder must be cleaned up"


def test_existing_output_needs_force(tiny_whisper_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="--force"):
        export_bundle(ExportOptions(str(tiny_whisper_dir), tmp_path))
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_unreachable_hub_id_is_a_clear_error(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match="openai/whisper-nonexistent"):
        export_bundle(ExportOptions("openai/whisper-nonexistent", tmp_path / "b"))


def test_real_tiny_en_parity(real_bundle: Path) -> None:
    """Real weights: greedy tokens identical to transformers on every human clip."""
    parity = json.loads((real_bundle / "manifest.json").read_text())["parity"]
    assert parity["identical_clips"] == len(parity["clips"]) == 4
    assert parity["max_logit_diff"] <= 1e-3
    assert parity["max_mel_diff"] <= 1e-4
    assert all(c["tokens"] > 5 for c in parity["clips"])
    # the 16-token block, teacher-forcing prompt + tokens, against the same full forward
    assert parity["max_block_logit_diff"] <= 1e-3
    assert all(c["max_block_logit_diff"] <= 1e-3 for c in parity["clips"])
    m = load_manifest(real_bundle)
    assert m.graph("decoder").output("logits").shape == (1, "tokens", 51864)
    assert m.graph("decoder").dims == {"tokens": (1, BLOCK)}


def test_real_int8_export_passes_the_gate(tmp_path: Path) -> None:
    """--quantize int8 on real tiny.en: the gate measures it against fp32 on the project's real
    clips (WER over the clips clean and with 20 dB noise, greedy-token agreement over clean and
    noisy windows), the table is in the manifest, and the int8 graphs fit the size target (45 MB).

    Agreement decides here, the measure with power: 0.967 over 644 positions of 48 windows for
    all-dynamic int8 with the encoder's attention output projections kept fp32 (0.938 without),
    0.978-0.980 with today's blockwise decoder and encoder attention outputs. The WER difference
    over those 748 words is not stable enough for a tight budget: all-dynamic int8 measured +0.0
    to +2.3 points in six measurements (fused or not, output projections fp32 or not, the
    log-mel product as einsum or BLAS, 1 ulp apart), today's int8 +0.67 and +0.80, the same few
    words ("its" -> "it") repeated in the noisy copies; so this test sets a 3-point budget and
    checks the row is the one the gate judged."""
    from conftest import HUMAN_CLIPS, speech_dir

    clips = tuple(speech_dir() / c for c in HUMAN_CLIPS)
    out = tmp_path / "int8"
    export_bundle(ExportOptions("builtin:whisper-tiny.en", out, parity_audio=clips[:1],
                                quantize="int8", eval_windows=48, wer_budget=3.0))
    data = json.loads((out / "manifest.json").read_text())
    acc = data["accuracy"]
    fp32, int8 = acc["rows"]
    assert acc["chosen"] == "int8" and int8["passed"] and acc["windows"] == 48
    assert fp32["wer_words"] == int8["wer_words"] == 4 * 187  # clean + three noisy copies
    assert fp32["wer"] <= 5.0 and int8["wer_delta"] <= 3.0 and int8["agreement"] >= 0.95
    assert int8["size_mb"] <= 45.0 < fp32["size_mb"] / 3
    precision = {g["name"]: g["precision"] for g in data["graphs"]}
    assert precision == {"encoder": "int8", "decoder": "int8", "vad": "fp32"}
    Bundle.open(out)
