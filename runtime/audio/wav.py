"""Read WAV files and raw PCM into float32 sample arrays.

The RIFF chunks are parsed here rather than with the stdlib ``wave`` module because ``wave`` reads
only integer PCM; kiosk recordings and test fixtures also come as IEEE float and as
WAVE_FORMAT_EXTENSIBLE. Supported encodings: integer PCM of 8 (unsigned), 16, 24 and 32 bits and
IEEE float of 32 and 64 bits, each either plain or wrapped in WAVE_FORMAT_EXTENSIBLE. Anything
else (ADPCM, mu-law, MP3-in-WAV, big-endian RIFX, RF64) is refused with an :class:`AudioInputError`
that says how to convert the file.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from edgestream.runtime.errors import AudioInputError

logger = logging.getLogger(__name__)

__all__ = ["WavAudio", "read_wav", "to_mono", "pcm16_to_float"]

CONVERT_HINT = "convert it with `ffmpeg -i INPUT -ar 16000 -ac 1 out.wav`"

_FORMAT_PCM = 0x0001
_FORMAT_FLOAT = 0x0003
_FORMAT_EXTENSIBLE = 0xFFFE
# The 14 bytes that follow the 2-byte format code in an EXTENSIBLE sub-format GUID.
_KSDATAFORMAT_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
# Writers that stream to a pipe cannot seek back to fill in sizes and leave this placeholder.
_UNKNOWN_SIZE = 0xFFFFFFFF
# Largest float32 below 1.0: the contract is a half-open range [-1, 1).
_BELOW_ONE = np.float32(1.0 - 2.0**-24)


@dataclass(frozen=True)
class WavAudio:
    """Decoded audio of one WAV file.

    Attributes:
        samples: float32 array shaped ``[frames, channels]`` with values in ``[-1, 1)``.
        sample_rate: frames per second, as stated by the file.
        path: the file it was read from.
    """

    samples: np.ndarray
    sample_rate: int
    path: Path

    @property
    def frames(self) -> int:
        """Number of sample frames (one sample per channel each)."""
        return int(self.samples.shape[0])

    @property
    def channels(self) -> int:
        """Number of interleaved channels."""
        return int(self.samples.shape[1])

    @property
    def duration_s(self) -> float:
        """Length in seconds."""
        return self.frames / self.sample_rate


@dataclass(frozen=True)
class _Format:
    code: int  # _FORMAT_PCM or _FORMAT_FLOAT after unwrapping EXTENSIBLE
    channels: int
    sample_rate: int
    block_align: int
    bits: int  # container bits per sample


def read_wav(path: Path | str) -> WavAudio:
    """Read a RIFF/WAVE file into float32 samples shaped ``[frames, channels]``.

    Integer PCM is scaled by its full-scale value (so 16-bit -32768 maps to -1.0); float data is
    passed through with NaN set to 0 and values clipped to ``[-1, 1)``. A trailing partial frame
    at the end of a complete data chunk is dropped with a warning.

    Raises:
        AudioInputError: the file is missing or unreadable, is not a WAV file, uses an unsupported
            encoding, is truncated, or holds no audio.
    """
    path = Path(path)
    if path.is_dir():
        raise AudioInputError(f"{path}: is a folder, not a WAV file; pass the path of a .wav file.")
    if not path.exists():
        raise AudioInputError(
            f"{path}: no such audio file; check the path (a WAV file is expected)."
        )
    try:
        with path.open("rb") as f:
            fmt, data = _read_chunks(f, path, os.fstat(f.fileno()).st_size)
    except OSError as exc:
        raise AudioInputError(
            f"{path}: cannot be read ({exc.strerror or exc}); check its permissions."
        ) from exc

    frames = len(data) // fmt.block_align
    if frames == 0:
        raise AudioInputError(
            f"{path}: the WAV file holds no audio frames; record or export it again."
        )
    if len(data) % fmt.block_align:
        logger.warning(
            "%s: dropping a trailing partial frame of %d bytes", path, len(data) % fmt.block_align
        )
    raw = memoryview(data)[: frames * fmt.block_align]
    samples = _decode(raw, fmt).reshape(frames, fmt.channels)
    return WavAudio(samples=samples, sample_rate=fmt.sample_rate, path=path)


def _read_chunks(f: BinaryIO, path: Path, file_size: int) -> tuple[_Format, bytes]:
    """Walk the RIFF chunk list; return the parsed fmt chunk and the data chunk's bytes."""
    header = f.read(12)
    if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        kinds = {b"RIFX": "a big-endian RIFX file", b"RF64": "an RF64 file"}
        kind = kinds.get(header[:4], "not a WAV file")
        raise AudioInputError(f"{path}: {kind} (no RIFF/WAVE header); {CONVERT_HINT}.")

    fmt: _Format | None = None
    pos = 12
    while pos + 8 <= file_size:
        f.seek(pos)
        chunk_id, size = struct.unpack("<4sI", f.read(8))
        body = pos + 8
        if chunk_id == b"fmt ":
            fmt = _parse_fmt(f.read(min(size, 64)), path)
        elif chunk_id == b"data":
            if fmt is None:
                raise AudioInputError(
                    f"{path}: the data chunk comes before the fmt chunk; {CONVERT_HINT}."
                )
            available = file_size - body
            if size == _UNKNOWN_SIZE:
                size = available
            elif size > available:
                claimed, present = size // fmt.block_align, available // fmt.block_align
                raise AudioInputError(
                    f"{path}: truncated WAV file: the data chunk header claims {claimed} frames "
                    f"but only {present} are present; copy or record the file again."
                )
            return fmt, f.read(size)
        # Chunks are word-aligned: an odd-sized body is followed by one pad byte.
        pos = body + size + (size & 1)

    if fmt is None:
        raise AudioInputError(f"{path}: WAV file without a fmt chunk; {CONVERT_HINT}.")
    raise AudioInputError(
        f"{path}: WAV file without a data chunk (no audio); record or export it again."
    )


def _parse_fmt(body: bytes, path: Path) -> _Format:
    """Validate a fmt chunk and reduce EXTENSIBLE to its plain PCM/float sub-format."""
    if len(body) < 16:
        raise AudioInputError(
            f"{path}: the WAV fmt chunk is {len(body)} bytes, too short; {CONVERT_HINT}."
        )
    code, channels, rate, _byte_rate, block_align, bits = struct.unpack("<HHIIHH", body[:16])
    if code == _FORMAT_EXTENSIBLE:
        if len(body) < 40 or body[26:40] != _KSDATAFORMAT_TAIL:
            raise AudioInputError(
                f"{path}: WAVE_FORMAT_EXTENSIBLE with an unknown sub-format; {CONVERT_HINT}."
            )
        code = struct.unpack("<H", body[24:26])[0]
    if channels == 0:
        raise AudioInputError(
            f"{path}: the WAV header says 0 channels; the file is damaged, {CONVERT_HINT}."
        )
    if rate == 0:
        raise AudioInputError(
            f"{path}: the WAV header says a 0 Hz sample rate; the file is damaged, {CONVERT_HINT}."
        )
    supported = {_FORMAT_PCM: (8, 16, 24, 32), _FORMAT_FLOAT: (32, 64)}
    # Containers are whole bytes; e.g. 20-bit audio is stored left-justified in 24 bits.
    container = (bits + 7) // 8 * 8
    if code not in supported or container not in supported[code]:
        names = {_FORMAT_PCM: "integer PCM", _FORMAT_FLOAT: "IEEE float"}
        what = names.get(code, f"format code 0x{code:04x}")
        raise AudioInputError(
            f"{path}: unsupported WAV encoding ({what}, {bits} bits); only 8/16/24/32-bit PCM and "
            f"32/64-bit float are read, {CONVERT_HINT}."
        )
    if block_align != channels * container // 8:
        raise AudioInputError(
            f"{path}: inconsistent WAV header (block align {block_align} for {channels} "
            f"channels of {container} bits); {CONVERT_HINT}."
        )
    return _Format(
        code=code, channels=channels, sample_rate=rate, block_align=block_align, bits=container
    )


def _decode(raw: memoryview, fmt: _Format) -> np.ndarray:
    """Interleaved little-endian samples -> flat float32 in [-1, 1)."""
    if fmt.code == _FORMAT_FLOAT:
        x = np.frombuffer(raw, dtype="<f4" if fmt.bits == 32 else "<f8")
        x = np.nan_to_num(x.astype(np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
        return np.clip(x, -1.0, _BELOW_ONE)
    if fmt.bits == 8:  # 8-bit WAV is unsigned with 128 as silence
        x = np.frombuffer(raw, dtype=np.uint8).astype(np.float32)
        return (x - np.float32(128.0)) * np.float32(1 / 128)
    if fmt.bits == 16:
        return np.frombuffer(raw, dtype="<i2").astype(np.float32) * np.float32(1 / 32768)
    if fmt.bits == 24:
        # Place the 3 bytes in the top of an int32 so the sign comes for free, then scale by 2**31.
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        wide = np.zeros((b.shape[0], 4), dtype=np.uint8)
        wide[:, 1:] = b
        return wide.view("<i4")[:, 0].astype(np.float32) * np.float32(2.0**-31)
    x = np.frombuffer(raw, dtype="<i4").astype(np.float32) * np.float32(2.0**-31)
    # int32 -> float32 rounds 2**31-1 up to exactly 1.0.
    return np.minimum(x, _BELOW_ONE)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Average the channels of ``[frames, channels]`` samples into a float32 ``[frames]`` array.

    A 1-D array is taken to be mono already and returned as float32.
    """
    samples = np.asarray(samples)
    if samples.ndim == 1:
        return samples.astype(np.float32, copy=False)
    if samples.ndim != 2 or samples.shape[1] == 0:
        raise ValueError(f"to_mono expects [frames, channels] samples, got shape {samples.shape}")
    if samples.shape[1] == 1:
        return np.ascontiguousarray(samples[:, 0], dtype=np.float32)
    return samples.mean(axis=1, dtype=np.float32)


def pcm16_to_float(raw: bytes | bytearray | memoryview, channels: int) -> np.ndarray:
    """Convert raw interleaved s16le bytes into float32 samples shaped ``[frames, channels]``.

    Only whole frames are converted: trailing bytes that do not fill a frame
    (``len(raw) % (2 * channels)`` of them) are ignored, and a caller reading a stream must keep
    them and prepend them to the next read.
    """
    if channels < 1:
        raise ValueError(f"channels must be at least 1, got {channels}")
    frames = len(raw) // (2 * channels)
    x = np.frombuffer(raw, dtype="<i2", count=frames * channels)
    return (x.astype(np.float32) * np.float32(1 / 32768)).reshape(frames, channels)
