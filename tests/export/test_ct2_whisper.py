"""CTranslate2 Whisper import: binary reader, detection, and greedy parity with CTranslate2."""

from __future__ import annotations

import shutil
import string
import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from edgestream.export.whisper.ct2 import (
    BUILTIN_MODELS,
    builtin_folder,
    is_ct2_whisper_folder,
    load_ct2_whisper,
    read_ct2_variables,
)
from edgestream.export.errors import ExportError

from conftest import speech_dir  # the clips in tests/data/speech
CLIPS = ("beckett.wav", "arctic_a0007.wav", "arctic_a0009.wav")


def _tiny_folder() -> Path:
    try:
        return builtin_folder("whisper-tiny.en")
    except ExportError as exc:
        pytest.skip(f"real tiny.en weights unavailable: {exc}")


def _read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as wav:
        if (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) != (16000, 1, 2):
            pytest.fail(f"{path}: expected 16 kHz mono 16-bit PCM")
        frames = wav.readframes(wav.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _write_bin(path: Path, version: int, variables: list[tuple[str, np.ndarray]],
               aliases: list[tuple[str, str]] = ()) -> None:
    type_ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2,
                np.dtype(np.float16): 4}
    out = struct.pack("<I", version)
    if version >= 2:
        out += _string("WhisperSpec") + struct.pack("<I", 3)
    out += struct.pack("<I", len(variables))
    for name, array in variables:
        out += _string(name) + struct.pack("<B", array.ndim)
        out += b"".join(struct.pack("<I", d) for d in array.shape)
        if version >= 4:
            out += struct.pack("<BI", type_ids[array.dtype], array.nbytes)
        else:
            out += struct.pack("<BI", array.dtype.itemsize, array.size)
        out += array.astype(array.dtype.newbyteorder("<")).tobytes()
    if version >= 3:
        out += struct.pack("<I", len(aliases))
        out += b"".join(_string(a) + _string(t) for a, t in aliases)
    path.write_bytes(out)


def test_reader_versions_aliases_and_int8(tmp_path: Path) -> None:
    weight = np.array([[0.5, -1.0], [2.0, 0.25]], dtype=np.float32)
    scale = (127.0 / np.abs(weight).max(axis=1)).astype(np.float32)
    q = np.round(weight * scale[:, None]).astype(np.int8)
    half = np.arange(6, dtype=np.float16).reshape(2, 3)
    heads = np.array(6, dtype=np.int16)
    model_bin = tmp_path / "model.bin"
    variables = [("a/weight", q), ("a/weight_scale", scale), ("h", half), ("n", heads)]
    _write_bin(model_bin, 6, variables, [("b/weight", "h")])
    got = read_ct2_variables(model_bin)
    assert set(got) == {"a/weight", "h", "n", "b/weight"}
    assert got["a/weight"].dtype == np.float32
    np.testing.assert_allclose(got["a/weight"], weight, atol=0.02)
    assert got["h"].dtype == np.float16 and np.array_equal(got["b/weight"], half)
    assert got["n"].ndim == 0 and int(got["n"]) == 6
    for version in (1, 3):
        _write_bin(model_bin, version, [("w", weight), ("n", heads)])
        old = read_ct2_variables(model_bin)
        assert np.array_equal(old["w"], weight) and int(old["n"]) == 6


def test_truncated_model_bin_raises(tmp_path: Path) -> None:
    source = _tiny_folder() / "model.bin"
    with source.open("rb") as handle:
        head = handle.read(200_000)
    for cut in (3, 40, len(head)):
        broken = tmp_path / f"cut{cut}" / "model.bin"
        broken.parent.mkdir()
        broken.write_bytes(head[:cut])
        with pytest.raises(ExportError, match="model.bin"):
            read_ct2_variables(broken)


def test_detection(tmp_path: Path) -> None:
    folder = _tiny_folder()
    assert is_ct2_whisper_folder(folder)
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    assert not is_ct2_whisper_folder(tmp_path)
    (tmp_path / "model.bin").write_bytes(b"\x06\x00\x00\x00garbage")
    assert not is_ct2_whisper_folder(tmp_path)
    with pytest.raises(ExportError, match="not a CTranslate2 Whisper folder"):
        load_ct2_whisper(tmp_path)


def test_unknown_builtin() -> None:
    with pytest.raises(ExportError, match="whisper-tiny.en"):
        builtin_folder("whisper-huge-nope")
    assert "whisper-tiny.en" in BUILTIN_MODELS


def _greedy(model, features: np.ndarray, prompt: list[int], suppress: list[int],
            suppress_begin: list[int], eot: int, max_tokens: int = 100) -> list[int]:
    import torch

    tokens = list(prompt)
    with torch.inference_mode():
        encoded = model.model.encoder(torch.from_numpy(features)).last_hidden_state
        for _ in range(max_tokens):
            logits = model(encoder_outputs=(encoded,), decoder_input_ids=torch.tensor([tokens]),
                           use_cache=False).logits[0, -1]
            logits[suppress] = -np.inf
            if len(tokens) == len(prompt):
                logits[suppress_begin] = -np.inf
            token = int(logits.argmax())
            if token == eot:
                break
            tokens.append(token)
    return tokens[len(prompt):]


def _words(text: str) -> str:
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def test_greedy_tokens_match_ctranslate2() -> None:
    ctranslate2 = pytest.importorskip("ctranslate2")
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    from transformers import WhisperFeatureExtractor

    folder = _tiny_folder()
    model, info = load_ct2_whisper(folder)
    assert not info.is_multilingual and info.lang_ids == {}
    assert (info.sot, info.eot, info.no_timestamps) == (50257, 50256, 50362)
    assert model.generation_config.decoder_start_token_id == info.sot
    reference = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32")
    extractor = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    tokenizer = Tokenizer.from_file(str(info.tokenizer_json))
    prompt = [info.sot, info.no_timestamps]
    texts = {}
    for clip in CLIPS:
        audio = _read_wav(speech_dir() / clip)
        features = extractor(audio, sampling_rate=16000, return_tensors="np").input_features
        features = np.ascontiguousarray(features, dtype=np.float32)
        expected = reference.generate(ctranslate2.StorageView.from_array(features), [prompt],
                                      beam_size=1, max_length=448, suppress_blank=True,
                                      suppress_tokens=[-1])[0].sequences_ids[0]
        if expected and expected[-1] == info.eot:
            expected = expected[:-1]
        got = _greedy(model, features, prompt, list(info.suppress_ids),
                      list(info.suppress_ids_begin), info.eot)
        assert got == expected, f"{clip}: transformers {got} != CTranslate2 {expected}"
        assert got and all(t < info.eot for t in got), f"{clip}: non-text tokens in {got}"
        texts[clip] = _words(tokenizer.decode(got))
    assert "fail better" in texts["beckett.wav"], texts
