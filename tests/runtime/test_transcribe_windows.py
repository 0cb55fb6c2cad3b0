"""Whole-file transcription: the rest of a window whose text closed early is decoded again only
when the bundle's Silero VAD hears speech in it (a silent rest decoded on its own is where
Whisper invents "Thank you.")."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from conftest import references, speech_dir
from edgestream.export.wer import normalize
from edgestream.runtime import load
from edgestream.runtime.audio.wav import read_wav, to_mono
from edgestream.runtime.families.whisper.engine import WhisperEngine
from edgestream.runtime.families.whisper.transcribe import (WindowDecode, holds_speech,
                                                            transcribe_audio)

CLIP = "arctic_a0009.wav"  # one sentence, about 3 s


def _clip() -> np.ndarray:
    return to_mono(read_wav(speech_dir() / CLIP).samples).astype(np.float32)


def _quiet_noise(seconds: float, seed: int = 0) -> np.ndarray:
    """Room noise about 50 dB below full scale: no speech in it."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * 16000)) * 0.003).astype(np.float32)


def test_holds_speech_by_the_bundle_vad(tiny_bundle: Path) -> None:
    engine = WhisperEngine(load(tiny_bundle, provider="cpu", threads=1).bundle)
    assert holds_speech(engine, _clip())
    assert not holds_speech(engine, np.zeros(32000, np.float32))
    assert not holds_speech(engine, _quiet_noise(4.0))
    # a word in the middle of quiet noise is found (the state is fresh on every call)
    assert holds_speech(engine, np.concatenate([_quiet_noise(2.0), _clip()[8000:24000],
                                                _quiet_noise(2.0, 1)]))


def test_without_a_vad_the_rest_is_decoded_as_before(tiny_whisper_dir: Path,
                                                     tmp_path: Path) -> None:
    from edgestream.export.build import ExportOptions, export_bundle

    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    export_bundle(ExportOptions(str(tiny_whisper_dir), tmp_path / "novad", vad="none"))
    engine = WhisperEngine(load(tmp_path / "novad", provider="cpu", threads=1).bundle)
    assert holds_speech(engine, np.zeros(32000, np.float32))


def test_a_silent_rest_is_not_decoded_again(real_bundle: Path) -> None:
    """A sentence then 8 s of quiet noise: the text closes at about 3 s. Without the VAD check
    the next window would start there and decode the noise on its own."""
    engine = WhisperEngine(load(real_bundle, provider="cpu", threads=2).bundle)
    audio = np.concatenate([_clip(), _quiet_noise(8.0)])
    windows: list[WindowDecode] = []
    text = transcribe_audio(engine, audio, record=windows).text
    assert normalize(text) == normalize(references()[CLIP]), text
    assert [w.start for w in windows] == [0], [(w.start, w.tokens) for w in windows]
