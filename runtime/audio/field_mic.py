"""A microphone for a device in the field: it survives being unplugged.

When the capture device disappears (USB pulled, driver reset, host API hung), `ReopeningMic`
closes it, says `mic_lost`, and reopens it by the same name or index with exponential backoff,
then says `mic_restored` and reports the hole as a gap, so no caption line spans it. Whatever
rate the device opens at, blocks come out mono at one fixed rate (the model's), so the stream
never sees a format change across a reopen. While it waits it yields empty blocks: the loop
stays responsive to a stop and keeps its watchdog fed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np

from edgestream.runtime.audio.mic import MicSource, resolve_device
from edgestream.runtime.audio.resample import StreamingResampler
from edgestream.runtime.errors import AudioDeviceError

log = logging.getLogger(__name__)

IDLE_TICK_S = 0.25  # how often a waiting source hands the loop an empty block


class ReopeningMic:
    def __init__(self, spec: str | None, sample_rate: int, block_ms: int = 64,
                 backlog_s: float = 4.0, backoff_s: tuple[float, float] = (0.5, 30.0)) -> None:
        self.spec = spec or None
        self.sample_rate = sample_rate
        self.channels = 1
        self.block_ms = block_ms
        self.backlog_s = backlog_s
        self.backoff_s = backoff_s
        self.reopens = 0
        self._mic: MicSource | None = None
        self._resampler: StreamingResampler | None = None
        self._notices: list[tuple[str, str]] = []
        self._gap = 0
        self._stop = False
        self._closed = False
        self._totals = {"blocks": 0, "dropped_blocks": 0, "input_overflows": 0}
        self._last_block_at = 0.0
        self._lost_at: float | None = None
        self.lost = False  # never ends because of a lost device (it waits for it)

    @property
    def device_up(self) -> bool:
        return self._mic is not None

    def _open(self) -> MicSource:
        device = resolve_device(self.spec)
        # ask for the model's rate; a device that refuses it opens at its own and is resampled
        probe_rate = self.sample_rate
        frames = max(64, int(probe_rate * self.block_ms / 1000))
        mic = MicSource(device, sample_rate=probe_rate, block_frames=frames,
                        queue_blocks=max(2, int(self.backlog_s * 1000 / self.block_ms)))
        try:
            mic.start()
        except AudioDeviceError:
            mic.close()
            raise
        self._resampler = (StreamingResampler(mic.sample_rate, self.sample_rate)
                           if mic.sample_rate != self.sample_rate else None)
        return mic

    def _wait(self, seconds: float) -> Iterator[np.ndarray]:
        end = time.monotonic() + seconds
        while not self._stop and not self._closed and time.monotonic() < end:
            time.sleep(min(IDLE_TICK_S, max(0.0, end - time.monotonic())))
            yield np.zeros((0, 1), np.float32)

    def __iter__(self) -> Iterator[np.ndarray]:
        delay = self.backoff_s[0]
        attempts = 0
        while not self._stop and not self._closed:
            if self._mic is None:
                try:
                    self._mic = self._open()
                except AudioDeviceError as e:
                    attempts += 1
                    if attempts == 1 or attempts % 10 == 0:  # the journal, not a flood
                        log.warning("capture device %s unavailable (attempt %d, next in %.1f s): "
                                    "%s", self.spec or "default", attempts, delay, e)
                    yield from self._wait(delay)
                    delay = min(delay * 2, self.backoff_s[1])
                    continue
                attempts, delay = 0, self.backoff_s[0]
                if self._lost_at is not None:
                    hole = time.monotonic() - self._lost_at
                    self._gap += int(round(hole * self.sample_rate))
                    self.reopens += 1
                    self._notices.append(("mic_restored", f"capture device "
                                          f"{self._mic.device.describe()} is back after "
                                          f"{hole:.1f} s; a new line starts"))
                    self._lost_at = None
            mic = self._mic
            for block in mic:
                self._gap += int(round(mic.take_gap() * self.sample_rate / mic.sample_rate))
                self._last_block_at = time.monotonic()
                mono = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
                if self._resampler is not None:
                    mono = self._resampler.process(mono)
                yield mono[:, None]
            if self._stop or self._closed:
                break
            self._retire(mic)
            self._lost_at = self._last_block_at or time.monotonic()
            self._notices.append(("mic_lost", f"capture device {mic.device.describe()} stopped "
                                  "delivering audio (unplugged or failed); reopening it"))
            yield np.zeros((0, 1), np.float32)  # let the loop say so now

    def _retire(self, mic: MicSource) -> None:
        for key, value in mic.counters().items():
            self._totals[key] += value
        mic.close()
        self._mic = None

    def take_gap(self) -> int:
        gap, self._gap = self._gap, 0
        return gap

    def take_notices(self) -> list[tuple[str, str]]:
        notices, self._notices = self._notices, []
        return notices

    def request_stop(self) -> None:
        self._stop = True
        if self._mic is not None:
            self._mic.request_stop()

    def counters(self) -> dict[str, int]:
        live = self._mic.counters() if self._mic is not None else {}
        out = {k: v + live.get(k, 0) for k, v in self._totals.items()}
        out["reopens"] = self.reopens
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._mic is not None:
            self._retire(self._mic)
