"""Moonshine Streaming's hypothesis policy for the stream gate: every frame encoded once,
the line re-decoded over the memory by re-scoring the previous hypothesis.

While a line is open each whole chunk goes through the encoder once and its real frames are
appended to the cross-attention memory; a partial re-scores the previous hypothesis in block
passes and steps only where it departs. The final zero-pads the last partial chunk, flushes the
encoder's lookahead and decodes the line once more. Idle audio costs no compute.

Context: a pause long enough for the endpoint often falls inside a sentence, and a line read on
its own loses words at its edges. When the previous line started at most `context_s` before
this one, the line is read as the continuation of it: the memory is rebuilt from the previous
line's start (its audio, the pause and this line, one continuous utterance to the encoder) and
the previous final's tokens are forced after the prompt, so the decoder goes on from what was
said. Only the previous final is used, never later speech. If the forced text makes the decoder
end at once although the line holds speech, the line is decoded again on its own.
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
    `fallback`: decode a looping or repetitive final again at rising temperatures;
    `context_s`: carry the previous line (its audio and final) when it started at most this long
    before the line (0: every line alone)."""

    partial_ms: int = 200
    preroll_ms: int = 320
    tokens_per_second: float = 8.0
    max_repeats: int = 4
    fallback: bool = True
    context_s: float = 6.0


@dataclass(frozen=True)
class _Said:
    """The previous line's final: its text tokens and where its audio lies (stream samples)."""

    tokens: tuple[int, ...]
    start: int
    end: int


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
        # recent audio (at most `context_s` plus pre-roll), for a line read with context
        self.recent = np.zeros(0, dtype=np.float32)
        self.recent_start = 0
        self.memory_from: int | None = None  # stream sample the open line's memory starts at
        self.said: _Said | None = None  # the previous line's final
        self.forced: tuple[int, ...] = ()  # its tokens, when the open line reads it as context

    def push(self, audio: np.ndarray) -> None:
        self._remember(audio)
        self.pending = np.concatenate([self.pending, audio]) if self.pending.size else audio
        if self.line_start is None:
            keep = self.options.preroll_ms * self.rate // 1000
            if self.pending.size > keep:
                self.pending_start += self.pending.size - keep
                self.pending = self.pending[-keep:]
        else:
            self._encode(pad=False)

    def begin(self, start: int) -> None:
        start = max(self.pending_start, start - self.options.preroll_ms * self.rate // 1000)
        said = self.said
        if said is not None and start - said.start <= self.options.context_s * self.rate and \
                said.start >= self.recent_start and self._fits(start - said.start):
            self._open(start, said.start, said.tokens)
        else:
            self._open(start, start, ())

    def partial(self) -> Hypothesis:
        self.hypothesis = list(self.engine.decode(self._budget(), self.options.max_repeats,
                                                  hint=self.hypothesis, forced=self.forced).tokens)
        return Hypothesis(text=self.engine.text(self.hypothesis))

    def final(self) -> LineText:
        start = self.line_start if self.line_start is not None else self.pending_start
        self._close_memory()
        judged = decode_with_fallback(self._decode, lambda r: self.engine.text(r.tokens),
                                      self.rules)
        end = start + self.encoded
        if self.forced and not judged.result.tokens and self.encoded:
            # the forced context made the decoder stop at once: read the line on its own
            self._open(start, start, (), until=end)
            self._close_memory()
            judged = decode_with_fallback(self._decode, lambda r: self.engine.text(r.tokens),
                                          self.rules)
        self.said = _Said(tuple(judged.result.tokens), start, end) if judged.text else None
        self.line_start = self.memory_from = None
        self.hypothesis = []
        self.forced = ()
        return LineText(judged.text, start, end)

    def full(self) -> bool:
        return self.engine.room < self.engine.n

    def snapshot(self) -> Any:
        return (self.pending, self.pending_start, self.line_start, self.encoded,
                list(self.hypothesis), self.recent, self.recent_start, self.memory_from,
                self.said, self.forced, self.engine.snapshot())

    def restore(self, snapshot: Any) -> None:
        (self.pending, self.pending_start, self.line_start, self.encoded, hypothesis,
         self.recent, self.recent_start, self.memory_from, self.said, self.forced,
         engine) = snapshot
        self.hypothesis = list(hypothesis)
        self.engine.restore(engine)

    def forget(self, resume_at: int) -> None:
        """A gap: nothing before it is context for what follows."""
        self.pending = np.zeros(0, dtype=np.float32)
        self.pending_start = resume_at
        self.recent = np.zeros(0, dtype=np.float32)
        self.recent_start = resume_at
        self.line_start = self.memory_from = None
        self.hypothesis = []
        self.said = None
        self.forced = ()

    def _open(self, start: int, memory_from: int, forced: tuple[int, ...],
              until: int | None = None) -> None:
        """Open a line at `start` whose memory is rebuilt from `memory_from` (the previous
        line's start when it is context, else the line itself) up to `until` (default: all the
        audio so far); `recent` holds that audio."""
        self.engine.reset()
        self.pending = self.recent[memory_from - self.recent_start:
                                   None if until is None else until - self.recent_start]
        self.pending_start = self.memory_from = memory_from
        self.line_start = start
        self.forced = forced
        self.hypothesis = []
        self._encode(pad=False)

    def _close_memory(self) -> None:
        if not self.engine.room < self.engine.n:  # a full memory took its last frames already
            self._encode(pad=True)
        self.engine.flush()

    def _fits(self, context_samples: int) -> bool:
        """Context may take at most half of the memory: the line needs the rest."""
        return context_samples // self.engine.frame_samples <= self.engine.m_max // 2

    def _remember(self, audio: np.ndarray) -> None:
        """Keep the last `context_s` plus pre-roll of audio, and all of an open line's memory
        (a line whose context failed is read again on its own)."""
        keep = int(self.options.context_s * self.rate) + \
            (self.options.preroll_ms * self.rate) // 1000 + self.rate  # 1 s: VAD latency
        self.recent = np.concatenate([self.recent, audio]) if self.recent.size else audio
        drop = self.recent.size - keep
        if self.memory_from is not None:
            drop = min(drop, self.memory_from - self.recent_start)
        if drop > 0:
            self.recent_start += drop
            self.recent = self.recent[drop:]

    def _decode(self, temperature: float) -> GreedyResult:
        return self.engine.decode(self._budget(), self.options.max_repeats,
                                  hint=self.hypothesis if temperature == 0 else (),
                                  temperature=temperature, seed=self.line_start or 0,
                                  forced=self.forced)

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
        self.pending = self.pending[done:]
        self.pending_start += done
        if self.line_start is not None:  # the line's own audio; context before it is not
            self.encoded = max(0, self.pending_start - self.line_start)
