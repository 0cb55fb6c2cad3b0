"""Moonshine Streaming's hypothesis policy for the stream gate: every frame encoded once,
the line re-decoded over the memory by re-scoring the previous hypothesis.

While a line is open each whole chunk goes through the encoder once and its real frames are
appended to the cross-attention memory; a partial re-scores the previous hypothesis in block
passes and steps only where it departs. The final zero-pads the last partial chunk, flushes the
encoder's lookahead and decodes the line once more. Idle audio is kept only as pre-roll, so
silence costs nothing and every line starts from fresh state, as the model sees an utterance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgestream.runtime.decode import GreedyResult
from edgestream.runtime.families.moonshine.engine import StreamingEncDecEngine
from edgestream.runtime.gate import Hypothesis, LineText
from edgestream.runtime.quality import QualityRules, decode_with_fallback

# Moonshine publishes no log-probability threshold: only loops and repetition trigger fallback
RULES = QualityRules(avg_logprob_min=-np.inf)


@dataclass(frozen=True)
class MoonshineOptions:
    """`partial_ms`: re-decode cadence; `preroll_ms`: audio kept before detected speech;
    `tokens_per_second`: decode budget per second of memory; `max_repeats`: loop guard;
    `fallback`: decode a looping or repetitive final again at rising temperatures."""

    partial_ms: int = 200
    preroll_ms: int = 320
    tokens_per_second: float = 8.0
    max_repeats: int = 4
    fallback: bool = True


class MoonshinePolicy:
    """One per stream: the engine holds the stream's encoder, memory and decoder state."""

    def __init__(self, engine: StreamingEncDecEngine, options: MoonshineOptions,
                 rules: QualityRules = RULES) -> None:
        self.engine = engine
        self.options = options
        self.rules = rules if options.fallback else QualityRules(
            compression_ratio_max=np.inf, avg_logprob_min=-np.inf, temperatures=())
        self.rate = engine.bundle.manifest.audio.sample_rate
        self.pending = np.zeros(0, dtype=np.float32)  # audio not yet encoded
        self.pending_start = 0  # stream sample of pending[0]
        self.line_start: int | None = None
        self.encoded = 0  # samples of the open line that went through the encoder
        self.hypothesis: list[int] = []

    def push(self, audio: np.ndarray) -> None:
        self.pending = np.concatenate([self.pending, audio]) if self.pending.size else audio
        if self.line_start is None:
            keep = self.options.preroll_ms * self.rate // 1000
            if self.pending.size > keep:
                self.pending_start += self.pending.size - keep
                self.pending = self.pending[-keep:]
        else:
            self._encode(pad=False)

    def begin(self, start: int) -> None:
        self.engine.reset()
        start = max(self.pending_start, start - self.options.preroll_ms * self.rate // 1000)
        self.pending = self.pending[start - self.pending_start:]
        self.pending_start = self.line_start = start
        self.encoded = 0
        self.hypothesis = []
        self._encode(pad=False)

    def partial(self) -> Hypothesis:
        self.hypothesis = list(self.engine.decode(self._budget(), self.options.max_repeats,
                                                  hint=self.hypothesis).tokens)
        return Hypothesis(text=self.engine.text(self.hypothesis))

    def final(self) -> LineText:
        start = self.line_start if self.line_start is not None else self.pending_start
        if not self.engine.room < self.engine.n:  # a full memory took its last frames already
            self._encode(pad=True)
        self.engine.flush()
        judged = decode_with_fallback(self._decode, lambda r: self.engine.text(r.tokens),
                                      self.rules)
        self.line_start = None
        self.hypothesis = []
        return LineText(judged.text, start, start + self.encoded)

    def full(self) -> bool:
        return self.engine.room < self.engine.n

    def snapshot(self) -> Any:
        return (self.pending, self.pending_start, self.line_start, self.encoded,
                list(self.hypothesis), self.engine.snapshot())

    def restore(self, snapshot: Any) -> None:
        (self.pending, self.pending_start, self.line_start, self.encoded, hypothesis,
         engine) = snapshot
        self.hypothesis = list(hypothesis)
        self.engine.restore(engine)

    def forget(self, resume_at: int) -> None:
        self.pending = np.zeros(0, dtype=np.float32)
        self.pending_start = resume_at
        self.line_start = None
        self.hypothesis = []

    def _decode(self, temperature: float) -> GreedyResult:
        return self.engine.decode(self._budget(), self.options.max_repeats,
                                  hint=self.hypothesis if temperature == 0 else (),
                                  temperature=temperature, seed=self.line_start or 0)

    def _budget(self) -> int:
        seconds = self.engine.memory_length * self.engine.frame_samples / self.rate
        return int(seconds * self.options.tokens_per_second) + 8

    def _encode(self, pad: bool) -> None:
        """Encode whole chunks of pending audio; with `pad`, also the last partial chunk,
        zero-padded (its frames past the audio are marked invalid)."""
        chunk, fs = self.engine.chunk, self.engine.frame_samples
        done = 0
        while self.pending.size - done >= chunk or (pad and self.pending.size - done > 0):
            if self.engine.room < self.engine.n:
                break  # the gate sees `full()` and closes the line
            piece = self.pending[done: done + chunk]
            # a frame is real when its first 5 ms hold audio (the recipe's protocol)
            valid = self.engine.n if piece.size == chunk else (piece.size + fs - 80) // fs
            taken = piece.size
            if piece.size < chunk:
                piece = np.concatenate([piece, np.zeros(chunk - piece.size, np.float32)])
            self.engine.push(piece, valid_frames=valid)
            done += taken
            self.encoded += taken
        self.pending = self.pending[done:]
        self.pending_start += done
