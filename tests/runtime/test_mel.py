"""Tests for edgestream.runtime.families.whisper.mel against transformers' WhisperFeatureExtractor."""

from __future__ import annotations

import ast
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgestream.runtime.families.whisper.mel import WhisperLogMel, slaney_mel_filters
from edgestream.runtime.audio.wav import read_wav, to_mono

transformers = pytest.importorskip("transformers", reason="transformers is needed as the reference")
from transformers import WhisperFeatureExtractor  # noqa: E402
from transformers.audio_utils import mel_filter_bank  # noqa: E402

from conftest import speech_dir  # tests/data/speech, in the repository
RUNTIME = Path(__file__).resolve().parents[2] / "runtime"
TOLERANCE = 1e-4


def _clips() -> list[tuple[str, np.ndarray]]:
    """Real speech: every human clip whole, two_cities' first 30 s, and a 2.3 s cut."""
    speech = speech_dir()
    clips = []
    for path in sorted(speech.glob("*.wav")):
        audio = to_mono(read_wav(path).samples)
        clips.append((path.name, audio))
    two_cities = to_mono(read_wav(speech / "two_cities.wav").samples)
    clips.append(("two_cities[:30s]", two_cities[: 30 * 16000]))
    clips.append(("two_cities[5s:7.3s]", two_cities[5 * 16000 : 5 * 16000 + 36800]))
    clips.append(("es_03", to_mono(read_wav(speech / "synthetic" / "es_03.wav").samples)))
    return clips


def _reference(extractor: WhisperFeatureExtractor, audio: np.ndarray) -> np.ndarray:
    return extractor(audio, sampling_rate=16000, return_tensors="np")["input_features"][0]


@pytest.mark.parametrize("n_mels", [80, 128])
def test_filter_bank_matches_transformers(n_mels: int) -> None:
    want = mel_filter_bank(
        num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0, max_frequency=8000,
        sampling_rate=16000, norm="slaney", mel_scale="slaney",
    )
    np.testing.assert_allclose(slaney_mel_filters(400, n_mels, 16000), want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_matches_whisper_feature_extractor_on_speech(n_mels: int) -> None:
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    mel = WhisperLogMel(n_mels=n_mels)
    worst = 0.0
    for name, audio in _clips():
        want = _reference(extractor, audio)
        start = time.perf_counter()
        got = mel(audio)
        elapsed = time.perf_counter() - start
        assert got.shape == (n_mels, 3000) and got.dtype == np.float32, name
        diff = float(np.abs(got - want).max())
        print(f"n_mels={n_mels} {name}: {len(audio) / 16000:.1f} s, max |diff| {diff:.2e}, "
              f"{elapsed * 1e3:.1f} ms")
        assert diff <= TOLERANCE, name
        worst = max(worst, diff)
    print(f"n_mels={n_mels}: worst max |diff| {worst:.2e}")


def test_silence_and_longer_than_window() -> None:
    extractor = WhisperFeatureExtractor()
    mel = WhisperLogMel()
    silent = np.zeros(1000, dtype=np.float32)
    np.testing.assert_allclose(mel(silent), -1.5, atol=1e-6)  # log10(1e-10) floor, then (x+4)/4
    np.testing.assert_allclose(mel(silent), _reference(extractor, silent), atol=TOLERANCE)
    # float64 input, 31 s long: trimmed to the first 30 s like the extractor.
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(31 * 16000) * 0.05
    np.testing.assert_allclose(mel(noise), _reference(extractor, noise), atol=TOLERANCE)
    np.testing.assert_array_equal(mel(noise), mel(noise[: 30 * 16000].astype(np.float32)))


def test_small_window_parameters() -> None:
    """A short window (as a streaming caller might use) still matches the extractor's maths."""
    extractor = WhisperFeatureExtractor(chunk_length=1)
    mel = WhisperLogMel(n_samples=16000)
    audio = np.random.default_rng(1).standard_normal(12000).astype(np.float32) * 0.1
    got = mel(audio)
    assert got.shape == (80, 100)
    np.testing.assert_allclose(got, _reference(extractor, audio), atol=TOLERANCE)


@pytest.mark.parametrize("kwargs", [{"n_mels": 0}, {"hop": -1}, {"n_fft": 400.0}, {"n_samples": 100}])
def test_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        WhisperLogMel(**kwargs)


def test_rejects_stereo() -> None:
    with pytest.raises(ValueError, match="1-D"):
        WhisperLogMel()(np.zeros((100, 2), dtype=np.float32))


@pytest.mark.parametrize("module", ["audio/wav.py", "audio/resample.py", "families/whisper/mel.py"])
def test_device_modules_import_only_stdlib_and_numpy(module: str) -> None:
    tree = ast.parse((RUNTIME / module).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    allowed = set(sys.stdlib_module_names) | {"numpy", "edgestream"}
    assert roots <= allowed, roots - allowed


@pytest.mark.parametrize("piece", [7, 250, 999])
def test_pieces_equal_the_whole_window(piece: int) -> None:
    """The STFT a piece of frames at a time (and the padding's skipped frames) gives the numbers
    of one whole-window pass, on real speech and on a window with no padding at all."""
    whole, pieces = WhisperLogMel(), WhisperLogMel()
    whole.PIECE_FRAMES = whole.n_frames  # one piece: the whole window at once
    pieces.PIECE_FRAMES = piece
    two_cities = to_mono(read_wav(speech_dir() / "two_cities.wav").samples)
    for name, audio in _clips() + [("two_cities[:31s]", two_cities[: 31 * 16000])]:
        np.testing.assert_allclose(pieces(audio), whole(audio), atol=1e-5, err_msg=name)


def test_transient_memory_is_bounded() -> None:
    """A full 30 s window allocates a few MB at most (the whole-window STFT took ~30 MB at the
    transcribing process's peak)."""
    import tracemalloc

    mel = WhisperLogMel()
    audio = to_mono(read_wav(speech_dir() / "two_cities.wav").samples)[: 30 * 16000]
    tracemalloc.start()
    try:
        mel(audio)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8e6, f"{peak / 1e6:.1f} MB"
