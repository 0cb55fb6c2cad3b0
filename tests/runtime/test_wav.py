"""Tests for edgestream.runtime.audio.wav: RIFF parsing, decoding and the error messages."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from edgestream.runtime.errors import AudioInputError
from edgestream.runtime.audio.wav import WavAudio, pcm16_to_float, read_wav, to_mono

from conftest import speech_dir  # tests/data/speech, in the repository

_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


def _write_stdlib(path: Path, ints: np.ndarray, width: int, rate: int = 16000) -> None:
    """Write integer PCM [frames, ch] with the stdlib wave module."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(ints.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        dtype = {1: np.uint8, 2: "<i2", 4: "<i4"}[width]
        w.writeframes(ints.astype(dtype).tobytes())


def _write_by_hand(
    path: Path,
    payload: bytes,
    *,
    code: int,
    channels: int,
    bits: int,
    rate: int = 16000,
    extensible: bool = False,
    data_size: int | None = None,
    extra_chunk: bytes = b"",
) -> None:
    """Assemble a RIFF/WAVE file byte by byte."""
    block = channels * bits // 8
    if extensible:
        fmt = struct.pack("<HHIIHH", 0xFFFE, channels, rate, rate * block, block, bits)
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", code) + _GUID_TAIL
    else:
        fmt = struct.pack("<HHIIHH", code, channels, rate, rate * block, block, bits)
    size = len(payload) if data_size is None else data_size
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra_chunk
    body += b"data" + struct.pack("<I", size) + payload
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def test_16bit_stereo_roundtrip(tmp_path: Path) -> None:
    ints = np.array([[0, -32768], [16384, 32767], [-1, 1]])
    _write_stdlib(tmp_path / "a.wav", ints, 2, rate=22050)
    audio = read_wav(tmp_path / "a.wav")
    assert isinstance(audio, WavAudio)
    assert audio.sample_rate == 22050 and audio.samples.shape == (3, 2) and audio.channels == 2
    assert audio.samples.dtype == np.float32
    np.testing.assert_array_equal(audio.samples, ints / 32768.0)


def test_8bit_and_32bit_int(tmp_path: Path) -> None:
    _write_stdlib(tmp_path / "u8.wav", np.array([[0], [128], [255]]), 1)
    np.testing.assert_array_equal(read_wav(tmp_path / "u8.wav").samples[:, 0], [-1.0, 0.0, 127 / 128])
    _write_stdlib(tmp_path / "i32.wav", np.array([[-(2**31)], [2**30], [2**31 - 1]]), 4)
    got = read_wav(tmp_path / "i32.wav").samples[:, 0]
    assert got[0] == -1.0 and got[1] == 0.5 and 0.999 < got[2] < 1.0


def test_24bit_by_hand(tmp_path: Path) -> None:
    values = np.array([-(2**23), -1, 0, 1, 2**22, 2**23 - 1])
    payload = b"".join(int(v).to_bytes(3, "little", signed=True) for v in values)
    _write_by_hand(tmp_path / "a.wav", payload, code=1, channels=2, bits=24)
    audio = read_wav(tmp_path / "a.wav")
    assert audio.samples.shape == (3, 2)
    np.testing.assert_array_equal(audio.samples.ravel(), values / 2.0**23)


@pytest.mark.parametrize("dtype,bits", [("<f4", 32), ("<f8", 64)])
@pytest.mark.parametrize("extensible", [False, True])
def test_float(tmp_path: Path, dtype: str, bits: int, extensible: bool) -> None:
    values = np.array([0.0, 0.25, -0.5, 0.999, -1.0, 1.5, np.nan], dtype=dtype)
    _write_by_hand(tmp_path / "f.wav", values.tobytes(), code=3, channels=1, bits=bits, extensible=extensible)
    got = read_wav(tmp_path / "f.wav").samples[:, 0]
    np.testing.assert_allclose(got[:5], values[:5], atol=1e-7)
    assert got[5] < 1.0 and got[5] > 0.999  # clipped into [-1, 1)
    assert got[6] == 0.0  # NaN becomes silence


def test_extensible_pcm_and_odd_chunk_skipped(tmp_path: Path) -> None:
    ints = np.array([1000, -1000, 32767], dtype="<i2")
    # A LIST chunk with an odd size must be skipped including its pad byte.
    junk = b"LIST" + struct.pack("<I", 3) + b"abc\x00"
    _write_by_hand(tmp_path / "e.wav", ints.tobytes(), code=1, channels=1, bits=16, extensible=True, extra_chunk=junk)
    np.testing.assert_array_equal(read_wav(tmp_path / "e.wav").samples[:, 0], ints / 32768.0)


def test_streamed_unknown_size_reads_to_end(tmp_path: Path) -> None:
    ints = np.arange(10, dtype="<i2")
    _write_by_hand(tmp_path / "s.wav", ints.tobytes(), code=1, channels=1, bits=16, data_size=0xFFFFFFFF)
    assert read_wav(tmp_path / "s.wav").frames == 10


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioInputError, match="nope.wav.*no such audio file"):
        read_wav(path)


def test_folder(tmp_path: Path) -> None:
    with pytest.raises(AudioInputError, match="is a folder"):
        read_wav(tmp_path)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not audio\n")
    with pytest.raises(AudioInputError) as info:
        read_wav(path)
    msg = str(info.value)
    assert "notes.txt" in msg and "not a WAV file" in msg and "ffmpeg -i INPUT -ar 16000 -ac 1 out.wav" in msg


def test_truncated(tmp_path: Path) -> None:
    payload = np.zeros(50, dtype="<i2").tobytes()
    _write_by_hand(tmp_path / "t.wav", payload, code=1, channels=1, bits=16, data_size=200)
    with pytest.raises(AudioInputError, match=r"t\.wav.*claims 100 frames but only 50 are present"):
        read_wav(tmp_path / "t.wav")


def test_compressed_format(tmp_path: Path) -> None:
    _write_by_hand(tmp_path / "adpcm.wav", bytes(64), code=0x0002, channels=1, bits=4)
    with pytest.raises(AudioInputError, match=r"adpcm\.wav.*unsupported WAV encoding.*0x0002"):
        read_wav(tmp_path / "adpcm.wav")


def test_unsupported_bit_depth(tmp_path: Path) -> None:
    _write_by_hand(tmp_path / "f16.wav", bytes(8), code=3, channels=1, bits=16)
    with pytest.raises(AudioInputError, match="unsupported WAV encoding"):
        read_wav(tmp_path / "f16.wav")


@pytest.mark.parametrize("channels,rate,what", [(0, 16000, "0 channels"), (1, 0, "0 Hz")])
def test_zero_channels_or_rate(tmp_path: Path, channels: int, rate: int, what: str) -> None:
    fmt = struct.pack("<HHIIHH", 1, channels, rate, 0, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", 2) + b"\x00\x00"
    (tmp_path / "z.wav").write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    with pytest.raises(AudioInputError, match=f"z.wav.*{what}"):
        read_wav(tmp_path / "z.wav")


def test_empty_data(tmp_path: Path) -> None:
    _write_stdlib(tmp_path / "empty.wav", np.zeros((0, 1)), 2)
    with pytest.raises(AudioInputError, match=r"empty\.wav.*no audio"):
        read_wav(tmp_path / "empty.wav")


def test_to_mono() -> None:
    x = np.array([[1.0, 0.0], [0.5, -0.5]], dtype=np.float32)
    np.testing.assert_array_equal(to_mono(x), [0.5, 0.0])
    np.testing.assert_array_equal(to_mono(x[:, :1]), [1.0, 0.5])
    assert to_mono(x).dtype == np.float32
    with pytest.raises(ValueError):
        to_mono(np.zeros((2, 2, 2)))


def test_pcm16_to_float_whole_frames_only() -> None:
    raw = np.array([0, -32768, 16384, 32767, 7], dtype="<i2").tobytes() + b"\x01"
    out = pcm16_to_float(raw, channels=2)
    assert out.shape == (2, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([[0, -32768], [16384, 32767]]) / 32768.0)
    assert pcm16_to_float(b"", 1).shape == (0, 1)
    with pytest.raises(ValueError):
        pcm16_to_float(raw, 0)


def test_beckett_reads_as_16k_mono() -> None:
    audio = read_wav(speech_dir() / "beckett.wav")
    assert audio.sample_rate == 16000 and audio.channels == 1
    assert abs(audio.duration_s - 10.0) < 0.2
    assert 0.01 < np.abs(audio.samples).max() < 1.0
