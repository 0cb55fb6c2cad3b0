"""Whisper export: bundle layout, static state contract, parity gate (tiny random and real)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgestream.export.build import ExportOptions, export_bundle
from edgestream.export.errors import ExportError, ParityError
from edgestream.runtime.bundle import Bundle
from edgestream.runtime.manifest import load_manifest


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
        assert m.graph("decoder").output(s.output).shape == (1, 4, 1, 16)
    for s in cross_kv:  # filled by the encoder graph, read by the decoder
        assert (s.output_graph, s.graph, s.update) == ("encoder", "decoder", "replace")
    assert m.audio.sample_rate == 16000 and m.audio.window_samples == 480000
    assert m.decoding.prompt == (50257, 50362)
    assert m.tokenizer.special["timestamp_begin"] == 50363
    assert m.parity["passed"] and m.parity["max_logit_diff"] <= 1e-3
    assert m.parity["max_mel_diff"] <= 1e-4
    Bundle.open(tiny_bundle)  # every hash, name and shape checks out


def test_failed_parity_fails_the_export(tiny_whisper_dir: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from edgestream.export import whisper_graphs

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
