"""Audio sources other than the microphone: a WAV file (optionally paced like a microphone) and
raw 16-bit PCM on stdin. Every source yields float32 blocks shaped [frames, channels] at its own
rate; the loop converts to the model's rate and channel count."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import BinaryIO, Iterator, Protocol

import numpy as np

from edgestream.runtime.audio.wav import pcm16_to_float, read_wav


class AudioSource(Protocol):
    sample_rate: int
    channels: int

    def __iter__(self) -> Iterator[np.ndarray]: ...

    def counters(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class FileSource:
    """A WAV file read whole (errors surface before streaming), delivered in blocks; with
    `realtime` each block is released when its audio would have arrived from a microphone."""

    def __init__(self, path: Path, realtime: bool = False, block_frames: int = 1024) -> None:
        self.audio = read_wav(path)
        self.sample_rate = self.audio.sample_rate
        self.channels = self.audio.samples.shape[1]
        self.realtime = realtime
        self.block_frames = block_frames
        self._blocks = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        start = time.monotonic()
        samples = self.audio.samples
        for i in range(0, samples.shape[0], self.block_frames):
            block = samples[i: i + self.block_frames]
            if self.realtime:
                due = start + (i + block.shape[0]) / self.sample_rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            self._blocks += 1
            yield block

    def counters(self) -> dict[str, int]:
        return {"blocks": self._blocks, "dropped_blocks": 0, "input_overflows": 0}

    def close(self) -> None:
        pass


class PcmStdinSource:
    """Raw little-endian signed 16-bit PCM (interleaved) from a byte stream, stdin by default."""

    def __init__(self, sample_rate: int, channels: int = 1, stream: BinaryIO | None = None,
                 block_frames: int = 1024) -> None:
        self.sample_rate = sample_rate
        self.channels = channels
        self.stream = stream or sys.stdin.buffer
        self.block_bytes = block_frames * 2 * channels
        self._blocks = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        pending = b""
        while True:
            data = self.stream.read1(self.block_bytes) if hasattr(self.stream, "read1") \
                else self.stream.read(self.block_bytes)
            if not data:
                return
            pending += data
            whole = len(pending) - len(pending) % (2 * self.channels)
            if whole:
                self._blocks += 1
                yield pcm16_to_float(pending[:whole], self.channels)
                pending = pending[whole:]

    def counters(self) -> dict[str, int]:
        return {"blocks": self._blocks, "dropped_blocks": 0, "input_overflows": 0}

    def close(self) -> None:
        pass
