"""The streaming encoder-decoder driver: encode each chunk once while speech is active, re-decode
the line over the memory at most every `partial_ms`, flush and finalize at the endpoint.

Idle audio is kept only as a short pre-roll, so the encoder never runs on long silences and every
line starts from fresh state, exactly as the model would see that utterance on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgestream.runtime.events.types import Event, Final, Partial, SpeechStarted
from edgestream.runtime.families.moonshine.engine import StreamingEncDecEngine
from edgestream.runtime.events.stats import finalize_at_endpoint
from edgestream.runtime.vad import EndpointConfig, Endpointer


@dataclass(frozen=True)
class StreamingConfig:
    """`partial_ms`: re-decode cadence; `preroll_ms`: audio kept before detected speech;
    `tokens_per_second`: decode budget per second of memory; `max_repeats`: n-gram loop cap."""

    partial_ms: int = 200
    preroll_ms: int = 320
    tokens_per_second: float = 8.0
    max_repeats: int = 4
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)


class StreamingEncDecStreamer:
    """Feed audio at the model rate; get caption events back."""

    def __init__(self, engine: StreamingEncDecEngine, endpointer: Endpointer,
                 config: StreamingConfig) -> None:
        self.engine = engine
        self.endpointer = endpointer
        self.config = config
        self.rate = engine.bundle.manifest.audio.sample_rate
        self.pending = np.zeros(0, dtype=np.float32)  # audio not yet encoded
        self.pending_start = 0  # stream sample of pending[0]
        self.encoded_samples = 0  # audio of the current line that went through the encoder
        self.line = 0
        self.line_start = 0
        self.active = False
        self._since_partial = 0
        self._last_partial = ""
        self._hypothesis: list[int] = []
        self.final_latencies_ms: list[float] = []
        self.final_compute_ms: list[float] = []

    @property
    def now(self) -> float:
        return (self.pending_start + self.pending.size) / self.rate

    def feed(self, audio: np.ndarray) -> list[Event]:
        events: list[Event] = []
        self.pending = np.concatenate([self.pending, audio.astype(np.float32)])
        for vad in self.endpointer.process(audio):
            if vad.kind == "start" and not self.active:
                self._begin(vad.sample)
                events.append(SpeechStarted(self.line, vad.decided / self.rate,
                                            self.line_start / self.rate))
            elif vad.kind == "end" and self.active:
                events += finalize_at_endpoint(self._finalize, vad, self.rate,
                                               self.final_latencies_ms, self.final_compute_ms)
        if not self.active:
            keep = self.config.preroll_ms * self.rate // 1000
            if self.pending.size > keep:
                self.pending_start += self.pending.size - keep
                self.pending = self.pending[-keep:]
            return events
        events += self._encode_ready()
        if self._since_partial >= self.config.partial_ms * self.rate // 1000:
            events += self._partial()
        return events

    def finish(self) -> list[Event]:
        return self._finalize("end_of_input") if self.active else []

    def _begin(self, speech_sample: int) -> None:
        self.active = True
        self.engine.reset()
        start = max(self.pending_start, speech_sample - self.config.preroll_ms * self.rate // 1000)
        self.pending = self.pending[start - self.pending_start:]
        self.pending_start = self.line_start = start
        self.encoded_samples = 0
        self._since_partial = 0

    def _encode_ready(self, upto: int | None = None) -> list[Event]:
        """Encode whole chunks of pending audio (up to stream sample `upto`, zero-padding the last
        partial chunk when given). A line whose memory is full is finalized and a new one begun."""
        events: list[Event] = []
        chunk = self.engine.chunk
        end = self.pending.size if upto is None else max(0, upto - self.pending_start)
        done = 0
        while end - done >= chunk or (upto is not None and end - done > 0):
            if self.engine.room < self.engine.n:
                self._consume(done)
                events += self._finalize("window")
                self._begin(self.pending_start)
                events.append(SpeechStarted(self.line, self.now, self.line_start / self.rate))
                end, done = end - done, 0
                continue
            piece = self.pending[done: min(done + chunk, end)]
            # a frame is real when its first 5 ms hold audio (the recipe's protocol)
            fs = self.engine.frame_samples
            valid = self.engine.n if piece.size == chunk else (piece.size + fs - 80) // fs
            if piece.size < chunk:
                piece = np.concatenate([piece, np.zeros(chunk - piece.size, np.float32)])
            self.engine.push(piece, valid_frames=valid)
            taken = min(chunk, end - done)
            done += taken
            self._since_partial += taken
            self.encoded_samples += taken
        self._consume(done)
        return events

    def _consume(self, samples: int) -> None:
        self.pending = self.pending[samples:]
        self.pending_start += samples

    def _budget(self) -> int:
        seconds = self.engine.memory_length * self.engine.frame_samples / self.rate
        return int(seconds * self.config.tokens_per_second) + 8

    def _partial(self) -> list[Event]:
        self._since_partial = 0
        self._hypothesis = self.engine.decode(self._budget(), self.config.max_repeats,
                                              hint=self._hypothesis)
        text = self.engine.text(self._hypothesis)
        if text and text != self._last_partial:
            self._last_partial = text
            return [Partial(self.line, self.now, text, "")]
        return []

    def _finalize(self, reason: str, upto: int | None = None,
                  t: float | None = None) -> list[Event]:
        events: list[Event] = []
        t = self.now if t is None else t
        if reason != "window":  # a full memory was already encoded up to here
            events += self._encode_ready(self.pending_start + self.pending.size
                                         if upto is None else upto)
        self.engine.flush()
        text = self.engine.text(self.engine.decode(self._budget(), self.config.max_repeats,
                                                   hint=self._hypothesis))
        self._hypothesis = []
        end = self.line_start + self.encoded_samples
        if text:
            events.append(Final(self.line, t, text, reason, self.line_start / self.rate,
                                end / self.rate))
            self.line += 1
        self.active = False
        self._last_partial = ""
        return events
