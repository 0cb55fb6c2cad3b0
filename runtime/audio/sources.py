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


DEFAULT_BACKLOG_S = 4.0  # live sources keep at most this much unread audio (oldest dropped)


class AudioSource(Protocol):
    sample_rate: int
    channels: int

    def __iter__(self) -> Iterator[np.ndarray]: ...

    def take_gap(self) -> int:
        """Frames lost just before the block last yielded (0: contiguous)."""

    def request_stop(self) -> None:
        """End the iteration soon (safe from a signal handler)."""

    def counters(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class FileSource:
    """A WAV file read whole (errors surface before streaming), delivered in blocks.

    With `realtime` it behaves like a microphone: each block arrives when its audio would have
    been captured, and a reader that falls more than `backlog_s` behind loses the oldest audio
    (reported through `take_gap`), exactly as a capture queue of that size would. `speed` > 1
    plays the clock faster (soak runs: hours of audio through the live path in less time)."""

    def __init__(self, path: Path, realtime: bool = False, block_frames: int = 1024,
                 backlog_s: float = DEFAULT_BACKLOG_S, speed: float = 1.0) -> None:
        self.audio = read_wav(path)
        self.sample_rate = self.audio.sample_rate
        self.channels = self.audio.samples.shape[1]
        self.realtime = realtime
        self.speed = speed
        self.block_frames = block_frames
        self.backlog = int(backlog_s * self.sample_rate)
        self._blocks = 0
        self._dropped = 0
        self._gap = 0
        self._stop = False

    def __iter__(self) -> Iterator[np.ndarray]:
        start = time.monotonic()
        samples = self.audio.samples
        i = 0
        while i < samples.shape[0] and not self._stop:
            if self.realtime:
                arrived = min(int((time.monotonic() - start) * self.sample_rate * self.speed),
                              samples.shape[0])
                if arrived - i > self.backlog + self.block_frames:
                    # the capture queue would be full: its oldest blocks are gone
                    lost = (arrived - self.backlog - i) // self.block_frames * self.block_frames
                    self._gap += lost
                    self._dropped += lost // self.block_frames
                    i += lost
                due = start + (i + self.block_frames) / self.sample_rate / self.speed
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            block = samples[i: i + self.block_frames]
            i += block.shape[0]
            self._blocks += 1
            yield block

    def take_gap(self) -> int:
        gap, self._gap = self._gap, 0
        return gap

    def request_stop(self) -> None:
        self._stop = True

    def counters(self) -> dict[str, int]:
        return {"blocks": self._blocks, "dropped_blocks": self._dropped, "input_overflows": 0}

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
        self._stop = False

    def __iter__(self) -> Iterator[np.ndarray]:
        pending = b""
        while not self._stop:
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

    def take_gap(self) -> int:
        return 0  # a pipe blocks its writer instead of losing data

    def request_stop(self) -> None:
        self._stop = True

    def counters(self) -> dict[str, int]:
        return {"blocks": self._blocks, "dropped_blocks": 0, "input_overflows": 0}

    def close(self) -> None:
        pass
