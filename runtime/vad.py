"""Voice activity: per-frame speech probabilities (energy or the bundle's Silero graph) and an
endpointer that turns them into speech start / end-of-utterance decisions in milliseconds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgestream.runtime.session import GraphSession
from edgestream.runtime.state import StateStore

FRAME = 512  # 32 ms at 16 kHz: Silero's window; the energy gate uses the same framing


class FrameVad(Protocol):
    def frame_probability(self, frame: np.ndarray) -> float: ...

    def reset(self) -> None: ...


class EnergyVad:
    """Speech when a frame's RMS level is above `threshold_db` dBFS. Needs no model; good for a
    close-talking microphone in a quiet room."""

    def __init__(self, threshold_db: float = -40.0) -> None:
        self.threshold_db = threshold_db

    def frame_probability(self, frame: np.ndarray) -> float:
        rms = float(np.sqrt(np.mean(np.square(frame, dtype=np.float64)) + 1e-12))
        return 1.0 if 20.0 * np.log10(rms) > self.threshold_db else 0.0

    def reset(self) -> None:
        pass


class SileroVad:
    """The bundle's Silero VAD graph: 64 samples of context + 512 new, recurrent state carried."""

    CONTEXT = 64

    def __init__(self, session: GraphSession, states: StateStore, sample_rate: int) -> None:
        self.session = session
        self.states = states
        self.sr = np.array(sample_rate, dtype=np.int64)
        self.context = np.zeros(self.CONTEXT, dtype=np.float32)

    def frame_probability(self, frame: np.ndarray) -> float:
        x = np.concatenate([self.context, frame.astype(np.float32)])[None]
        feeds = self.states.feeds("vad")
        feeds.update({"input": x, "sr": self.sr})
        out = self.session.run(feeds)
        self.states.update("vad", out)
        self.context = x[0, -self.CONTEXT:].copy()
        return float(out["output"][0, 0])

    def reset(self) -> None:
        self.context[:] = 0.0
        for name in self.states.buffers:
            if self.states.pairs[name].graph == "vad":
                self.states.buffers[name] = np.zeros_like(self.states.buffers[name])


@dataclass(frozen=True)
class EndpointConfig:
    """Thresholds in ms: speech must last `min_speech_ms` to start an utterance, and
    `endpoint_ms` of trailing silence ends it."""

    threshold: float = 0.5
    min_speech_ms: int = 96
    endpoint_ms: int = 640


@dataclass(frozen=True)
class VadEvent:
    kind: str  # "start" or "end"
    sample: int  # stream position of the speech start, or of the speech end
    decided: int  # stream position at which the endpointer decided


class Endpointer:
    """Feeds audio through a frame VAD; reports utterance starts and ends (hysteresis in ms)."""

    def __init__(self, vad: FrameVad, config: EndpointConfig, sample_rate: int = 16000) -> None:
        self.vad = vad
        self.config = config
        self.rate = sample_rate
        self._pending = np.zeros(0, dtype=np.float32)
        self.position = 0  # samples consumed into whole frames
        self.in_speech = False
        self._speech_run = 0
        self._silence_run = 0
        self.last_speech_end = 0
        self.speech_frames = 0

    def _ms(self, frames: int) -> float:
        return frames * FRAME * 1000.0 / self.rate

    def process(self, audio: np.ndarray) -> list[VadEvent]:
        events: list[VadEvent] = []
        buf = np.concatenate([self._pending, audio]) if self._pending.size else audio
        n = buf.size // FRAME
        for i in range(n):
            p = self.vad.frame_probability(buf[i * FRAME: (i + 1) * FRAME])
            self.position += FRAME
            speech = p >= self.config.threshold
            if speech:
                self.speech_frames += 1
                self._speech_run += 1
                self._silence_run = 0
                self.last_speech_end = self.position
                if not self.in_speech and self._ms(self._speech_run) >= self.config.min_speech_ms:
                    self.in_speech = True
                    events.append(VadEvent("start", self.position - self._speech_run * FRAME,
                                          self.position))
            else:
                self._speech_run = 0
                self._silence_run += 1
                if self.in_speech and self._ms(self._silence_run) >= self.config.endpoint_ms:
                    self.in_speech = False
                    events.append(VadEvent("end", self.last_speech_end, self.position))
        self._pending = buf[n * FRAME:].copy()
        return events

    @property
    def speech_now(self) -> bool:
        """The last frame was speech."""
        return self._speech_run > 0

    def skip(self, samples: int) -> None:
        """`samples` of input are missing (a gap): start over after them."""
        self.reset()
        self.position += samples + self._pending.size  # the partial frame is dropped too
        self._pending = np.zeros(0, dtype=np.float32)
        self.last_speech_end = self.position

    def reset(self) -> None:
        self.vad.reset()
        self._speech_run = self._silence_run = 0
        self.in_speech = False
