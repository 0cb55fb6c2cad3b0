"""The Whisper streaming driver: LocalAgreement over a growing buffer, gated by the endpointer.

Every `step_ms` of audio while speech is active, the buffer is re-encoded and re-decoded with the
committed tokens forced; agreed words are committed (partials), closed segments become finals and
are cut from the buffer, and an endpoint or the window limit finalizes the rest. No decode runs on
audio the VAD calls silence: Whisper's favourite hallucinations happen exactly there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from edgestream.runtime.families.whisper.agreement import LocalAgreement
from edgestream.runtime.events.types import Event, Final, Partial, SpeechStarted
from edgestream.runtime.events.stats import finalize_at_endpoint
from edgestream.runtime.vad import EndpointConfig, Endpointer
from edgestream.runtime.families.whisper.engine import WhisperEngine

STEP_SAMPLES_PER_TIMESTAMP = 320  # Whisper timestamps are 20 ms apart


@dataclass(frozen=True)
class WhisperStreamConfig:
    """`step_ms`: re-decode cadence; `preroll_ms`: audio kept before detected speech;
    `max_repeats`: n-gram loop cap; `tokens_per_second`: cap on decoded tokens per buffer second."""

    step_ms: int = 500
    preroll_ms: int = 320
    max_repeats: int = 4
    tokens_per_second: float = 8.0
    adaptive_step: bool = False  # live input: decode less often when compute falls behind
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)


class WhisperStreamer:
    """Feed 16 kHz mono audio of any length; get caption events back."""

    def __init__(self, engine: WhisperEngine, endpointer: Endpointer, tokenizer: Tokenizer,
                 config: WhisperStreamConfig) -> None:
        self.engine = engine
        self.endpointer = endpointer
        self.tok = tokenizer
        self.config = config
        self.rate = engine.bundle.manifest.audio.sample_rate
        self.step = config.step_ms * self.rate // 1000
        self.window = engine.bundle.manifest.audio.window_samples
        self.agreement = LocalAgreement(self._word_start, engine.timestamp_begin)
        self.buffer = np.zeros(0, dtype=np.float32)
        self.buffer_start = 0  # stream sample of buffer[0]
        self.line = 0
        self.active = False
        self._since_decode = 0
        self._catch_up = 0
        self._last_partial = ""
        self.final_latencies_ms: list[float] = []
        self.final_compute_ms: list[float] = []
        self._word_cache: dict[int, bool] = {}

    def _word_start(self, token: int) -> bool:
        if token not in self._word_cache:
            piece = self.tok.id_to_token(token) or ""
            self._word_cache[token] = piece.startswith(("Ġ", " ")) or token >= self.engine.eot
        return self._word_cache[token]

    def _text(self, tokens: list[int]) -> str:
        return self.tok.decode(self.engine.text_tokens(tokens)).strip()

    @property
    def now(self) -> float:
        return (self.buffer_start + self.buffer.size) / self.rate

    def feed(self, audio: np.ndarray) -> list[Event]:
        """Consume audio; returns the events it caused, in order."""
        events: list[Event] = []
        self.buffer = np.concatenate([self.buffer, audio.astype(np.float32)])
        self._since_decode += audio.size
        for vad in self.endpointer.process(audio):
            if vad.kind == "start" and not self.active:
                self.active = True
                events.append(SpeechStarted(self.line, vad.decided / self.rate,
                                            vad.sample / self.rate))
            elif vad.kind == "end" and self.active:
                events += finalize_at_endpoint(self._finalize, vad, self.rate,
                                               self.final_latencies_ms, self.final_compute_ms)
        if not self.active:
            self._drop_silence()
            return events
        if self.buffer.size >= self.window - self.step:
            return events + self._finalize("window")
        if self._since_decode >= max(self.step, self._catch_up):
            events += self._decode_step()
        return events

    def finish(self) -> list[Event]:
        """End of input: finalize whatever is pending."""
        return self._finalize("end_of_input") if self.active else []

    def _drop_silence(self) -> None:
        keep = self.config.preroll_ms * self.rate // 1000
        if self.buffer.size > keep:
            self.buffer_start += self.buffer.size - keep
            self.buffer = self.buffer[-keep:]

    def _hypothesis(self) -> list[int]:
        self._since_decode = 0
        started = time.perf_counter()
        self.engine.encode(self.buffer)
        budget = int(self.buffer.size / self.rate * self.config.tokens_per_second) + 8
        committed = self.agreement.committed
        previous = self.agreement.previous or []
        hint = previous[len(committed):] if previous[: len(committed)] == committed else []
        out = self.engine.decode(committed, timestamps=True, max_new=budget,
                                 max_repeats=self.config.max_repeats, hint=hint)
        # When one decode takes longer than a step of audio, decode less often instead of
        # letting latency grow: the next decode waits for 1.25x this decode's compute.
        if self.config.adaptive_step:
            self._catch_up = int((time.perf_counter() - started) * 1.25 * self.rate)
        return self.agreement.committed + list(out.tokens)

    def _decode_step(self) -> list[Event]:
        events: list[Event] = []
        hyp = self._hypothesis()
        self.agreement.update(hyp)
        tentative = hyp[len(self.agreement.committed):]
        while (segment := self.agreement.closed_segment()) is not None:
            text = self.tok.decode(list(segment.tokens)).strip()
            start = self.buffer_start / self.rate + segment.start_step * 0.02
            cut = segment.end_step * STEP_SAMPLES_PER_TIMESTAMP
            if text:
                events.append(Final(self.line, self.now, text, "segment", start,
                                    self.buffer_start / self.rate + segment.end_step * 0.02))
                self.line += 1
            self.agreement.trim(segment)
            self.buffer = self.buffer[cut:]
            self.buffer_start += cut
            self._last_partial = ""
        confirmed = self._text(self.agreement.committed)
        full = self._text(self.agreement.committed + tentative)
        if full != self._last_partial and full:
            events.append(Partial(self.line, self.now, full, confirmed))
            self._last_partial = full
        return events

    def _finalize(self, reason: str, upto: int | None = None,
                  t: float | None = None) -> list[Event]:
        events: list[Event] = []
        t = self.now if t is None else t  # when the line was decided, before any cut
        keep = np.zeros(0, dtype=np.float32)
        if upto is not None:
            split = max(0, upto - self.buffer_start)
            self.buffer, keep = self.buffer[:split], self.buffer[split:]
        if self.buffer.size:
            hyp = self._hypothesis()
            self.agreement.update(hyp, complete=True)
            text = self._text(self.agreement.committed)
            if text:
                events.append(Final(self.line, t, text, reason,
                                    self.buffer_start / self.rate,
                                    (self.buffer_start + self.buffer.size) / self.rate))
                self.line += 1
        self.agreement.reset()
        self._last_partial = ""
        self.buffer_start += self.buffer.size
        self.buffer = keep
        self.active = self.endpointer.in_speech if reason == "window" else False
        return events
