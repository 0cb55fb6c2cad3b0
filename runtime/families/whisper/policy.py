"""Whisper's hypothesis policy for the stream gate: LocalAgreement over a window that carries
the lines before it as context.

Whisper reads 30 s windows. A line cut short by a pause is badly read on its own (a 2 s window
with no context loses words at both ends), so the window keeps up to `context_s` of the audio
before the open line, and the finals of that audio are forced into the decoder as closed,
timestamped segments. The model then continues the text it already wrote, over the audio it
already heard, exactly as it does inside one long window: finals come from context, never from
later speech.

While the line is open, every cadence the window is decoded with the line's committed tokens
forced; LocalAgreement commits what two consecutive hypotheses agree on. A committed segment
that Whisper closes with timestamps becomes a final on its own and joins the context.

Context is only as good as the text in it: Whisper copies what it is conditioned on, so one
hallucinated line ("a a a") in the context breeds more, and an hour of audio can run away for
minutes. Text joins the context only when its decode passed the quality rules at or below
the prompt-reset temperature (as offline), and the context is cleared when its text, read
across lines, loops (a pattern spread over many short lines that no single line shows).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edgestream.runtime.decode import GreedyResult
from edgestream.runtime.families.whisper.agreement import LocalAgreement
from edgestream.runtime.families.whisper.engine import WhisperEngine, loop_start
from edgestream.runtime.families.whisper.transcribe import split_segments
from edgestream.runtime.gate import Hypothesis, LineText
from edgestream.runtime.quality import QualityRules, compression_ratio, decode_with_fallback

STEP = 320  # samples per Whisper timestamp step (20 ms)


@dataclass(frozen=True)
class WhisperOptions:
    """`step_ms`: re-decode cadence; `context_s`: audio (and its finals) kept before a line;
    `preroll_ms`: audio kept before detected speech; `max_repeats`: loop guard;
    `tokens_per_second`: partial decode budget per second of line audio; `fallback`: decode a
    final that fails the quality rules again at rising temperatures. `language` (None: detect
    it, multilingual bundles) and `task` (transcribe or translate to English).
    `prompt_reset_temperature`: a final that needed a fallback above this temperature (or
    failed every rule) is shown but clears the context instead of joining it, as offline."""

    step_ms: int = 500
    context_s: float = 10.0
    preroll_ms: int = 320
    max_repeats: int = 4
    tokens_per_second: float = 8.0
    fallback: bool = True
    language: str | None = None
    task: str = "transcribe"
    prompt_reset_temperature: float = 0.5


@dataclass(frozen=True)
class _Said:
    """A finished piece of text and where its audio lies (stream samples)."""

    tokens: tuple[int, ...]
    start: int
    end: int


@dataclass
class _State:
    audio: np.ndarray
    start: int  # stream sample of audio[0]
    context: list[_Said]
    line_start: int | None  # None: no open line
    committed: list[int]
    previous: list[int] | None
    scores: list[float]  # log-probabilities of the committed text tokens, when they were chosen


class WhisperPolicy:
    """LocalAgreement with context; one per stream (the engine holds the stream's state)."""

    def __init__(self, engine: WhisperEngine, options: WhisperOptions,
                 rules: QualityRules = QualityRules()) -> None:
        self.engine = engine
        self.options = options
        self.rules = rules if options.fallback else QualityRules(temperatures=())
        self.tok = engine.tokenizer
        self.rate = engine.bundle.manifest.audio.sample_rate
        self.window = engine.bundle.manifest.audio.window_samples
        self.step = options.step_ms * self.rate // 1000
        self.tb = engine.timestamp_begin
        self.agreement = LocalAgreement(self._word_start, self.tb)
        self.s = _State(np.zeros(0, np.float32), 0, [], None, [], None, [])
        self._word_cache: dict[int, bool] = {}
        self._encoded: tuple[int, int] | None = None  # (start, samples) the engine holds

    # -- the gate's interface -----------------------------------------------------------------

    def push(self, audio: np.ndarray) -> None:
        self.s.audio = np.concatenate([self.s.audio, audio]) if self.s.audio.size else audio
        if self.s.line_start is None:
            self._trim_idle()

    def begin(self, start: int) -> None:
        preroll = self.options.preroll_ms * self.rate // 1000
        self._trim_idle()
        self.s.line_start = max(self.s.start, start - preroll)
        self.s.scores = []
        self.agreement.reset()

    def partial(self) -> Hypothesis:
        result = self._decode(0.0)
        if not self.s.context and self._no_speech(result):
            return Hypothesis()  # noise that passed the VAD: show nothing, commit nothing
        before = len(self.agreement.committed)
        # a segment whose close the loop guard forced has a guessed end (tiny.en closes a phrase
        # said six times at 5.4 s when the audio so far ends soon after 6.6 s): while more audio
        # may follow, agree only on the text before it; the final decodes it with what follows
        shown = result.tokens if result.guarded_at is None else result.tokens[: result.guarded_at]
        hyp = self.agreement.committed + list(shown)
        self.agreement.update(hyp)
        new = len(self.agreement.committed) - before
        self.s.scores += [lp for tok, lp in zip(shown[:new], result.logprobs[:new])
                          if tok < self.engine.eot]
        tentative = hyp[len(self.agreement.committed):]
        closed: list[LineText] = []
        while (segment := self.agreement.closed_segment()) is not None:
            start = self.s.start + segment.start_step * STEP
            end = self.s.start + segment.end_step * STEP
            self.agreement.trim(segment, shift=0)  # the buffer is kept: it is context now
            self.s.scores = self.s.scores[len(segment.tokens):]
            closed.append(LineText(self._text(segment.tokens), self.s.line_start or start, end))
            self.s.line_start = end
            self._remember([_Said(segment.tokens, start, end)], trusted=True)
        confirmed = self._text(self.agreement.committed)
        return Hypothesis(tuple(closed), self._text(self.agreement.committed + tentative),
                          confirmed)

    def final(self) -> LineText:
        line_start = self.s.line_start if self.s.line_start is not None else self.s.start
        end = self.s.start + self.s.audio.size
        def decode(temperature: float) -> GreedyResult:
            # judged as the whole line: the committed tokens' scores count too
            r = self.engine.text_scores(self._decode(temperature))
            return replace(r, logprobs=tuple(self.s.scores) + r.logprobs)

        # "no speech" is judged at the start of the window: only meaningful without context
        judged = decode_with_fallback(decode, lambda r: self._text(
            self.agreement.committed + list(r.tokens)), self.rules,
            None if self.s.context else self.engine.no_speech_probability)
        tokens = self.agreement.committed + list(judged.result.tokens)
        silent = judged.silent
        said: list[_Said] = []
        if not silent:
            closed, tail = split_segments(tokens, self.tb)
            said = [_Said(tuple(t), self.s.start + a * STEP, self.s.start + b * STEP)
                    for a, b, t in closed if t]
            if tail:
                opening = closed[-1][1] if closed else None
                rest = tokens[tokens.index(self.tb + opening) + 1:] if opening is not None \
                    else tokens
                text = tuple(t for t in rest if t < self.tb)
                begin = self.s.start + opening * STEP if opening is not None else line_start
                said.append(_Said(text, begin, end))
        self._remember(said, trusted=judged.ok and
                       judged.temperature <= self.options.prompt_reset_temperature)
        self.s.line_start = None
        self.s.scores = []
        self.agreement.reset()
        self._trim_idle()
        text = " ".join(filter(None, (self._text(s.tokens) for s in said)))
        return LineText(text, line_start, end)

    def _no_speech(self, result: GreedyResult) -> bool:
        """Whisper's no-speech rule on a partial decode (the line's words so far included)."""
        scores = self.s.scores + list(self.engine.text_scores(result).logprobs)
        return (self.engine.no_speech_probability(result) > self.rules.no_speech_min
                and bool(scores) and float(np.mean(scores)) < self.rules.avg_logprob_min)

    def full(self) -> bool:
        if self.s.audio.size < self.window - self.step:
            return False
        self.s.context = []  # make room: the line itself needs the window
        self._cut_front(self.s.line_start or self.s.start)
        return self.s.audio.size >= self.window - self.step

    def snapshot(self) -> Any:
        s = self.s
        return replace(s, context=list(s.context), committed=list(self.agreement.committed),
                       scores=list(s.scores),
                       previous=None if self.agreement.previous is None
                       else list(self.agreement.previous))

    def restore(self, snapshot: Any) -> None:
        self.s = replace(snapshot, context=list(snapshot.context), scores=list(snapshot.scores))
        self.agreement.committed = list(snapshot.committed)
        self.agreement.previous = None if snapshot.previous is None else list(snapshot.previous)

    def forget(self, resume_at: int) -> None:
        self.s = _State(np.zeros(0, np.float32), resume_at, [], None, [], None, [])
        self.agreement.reset()

    # -- internals ---------------------------------------------------------------------------

    def _remember(self, said: list[_Said], trusted: bool) -> None:
        """Let finished text join the context, or clear the context (see the module's note).

        Cleared as well when the context's text, read across its lines, holds an n-gram said
        more than `max_repeats` times in a row or compresses like a loop: clearing costs a
        line some conditioning, keeping a loop costs minutes of captions."""
        if not trusted:
            return self._clear_context()
        tokens = self._context_text()
        for item in said:
            old = len(tokens)
            tokens += [t for t in item.tokens if t < self.engine.eot]
            self.s.context.append(item)
            if self._loops(tokens, since=old) or \
                    compression_ratio(self._text(tokens)) > self.rules.compression_ratio_max:
                self._clear_context()
                tokens = []

    def _context_text(self) -> list[int]:
        return [t for c in self.s.context for t in c.tokens if t < self.engine.eot]

    def _loops(self, tokens: list[int], since: int, starting_before: int | None = None) -> bool:
        """Whether a loop (`loop_start`) ends in `tokens[since:]`; with `starting_before`, only
        one that begins before that index (a loop carried over from the context)."""
        for end in range(since + 1, len(tokens) + 1):
            start = loop_start(tokens[:end], self.options.max_repeats)
            if start is not None and (starting_before is None or start < starting_before):
                return True
        return False

    def _clear_context(self) -> None:
        """Forget the context; an open line's window then starts at the line."""
        self.s.context = []
        if self.s.line_start is not None:
            self._cut_front(self.s.line_start)

    def _word_start(self, token: int) -> bool:
        if token not in self._word_cache:
            piece = self.tok.id_to_token(token) or ""
            self._word_cache[token] = piece.startswith(("Ġ", " ")) or token >= self.engine.eot
        return self._word_cache[token]

    def _text(self, tokens: Any) -> str:
        return self.tok.decode(self.engine.text_tokens(list(tokens))).strip()

    def _stamp(self, sample: int) -> int:
        return self.tb + int(np.clip(round((sample - self.s.start) / STEP), 0, 1500))

    def _forced_context(self) -> list[int]:
        """The context's finals as closed, timestamped segments, as Whisper writes them."""
        forced: list[int] = []
        for said in self.s.context:
            if said.tokens:
                forced += [self._stamp(said.start), *said.tokens, self._stamp(said.end)]
        return forced

    def _decode(self, temperature: float) -> GreedyResult:
        """The line decoded after its context. Forced context can make Whisper end the text
        right after the last closed segment; a line the VAD heard as speech is then decoded
        without the forced context (its text still conditions the decoder, behind
        <|startofprev|>), so no line is lost to the context that should help it."""
        result = self._decode_with(temperature, forced_context=True)
        if self.s.context:
            context = self._context_text()
            said = context + [t for t in self.agreement.committed + list(result.tokens)
                              if t < self.engine.eot]
            if self._loops(said, since=len(context), starting_before=len(context)):
                # the line continues a loop of the context ("a" lines breeding "a a a a"):
                # the context is poison, not help; read the line on its own
                self._clear_context()
                return self._decode_with(temperature, forced_context=True)
        if self.s.context and not self.agreement.committed and \
                not any(t < self.engine.eot for t in result.tokens):
            result = self._decode_with(temperature, forced_context=False)
        return result

    def _decode_with(self, temperature: float, forced_context: bool) -> GreedyResult:
        s = self.s
        context = self._forced_context()
        # a tiny decoder (short static KV) cannot take much context text: drop the oldest
        while context and len(context) + len(self.engine.prompt) > self.engine.t_max // 2:
            s.context.pop(0)
            context = self._forced_context()
        line_s = (s.start + s.audio.size - (s.line_start or s.start)) / self.rate
        budget = int(line_s * self.options.tokens_per_second) + 8
        committed = self.agreement.committed
        if not forced_context:  # the window starts at the line; timestamps are moved back
            offset = max(0, ((s.line_start or s.start) - s.start) // STEP)
            self._encode(s.audio[offset * STEP:], s.start + offset * STEP)
            text = [t for said in s.context for t in said.tokens]
            r = self.engine.decode(timestamps=True, max_new=budget, previous=text,
                                   max_repeats=self.options.max_repeats,
                                   temperature=temperature, seed=s.start)
            tokens = tuple(t + offset if t >= self.tb else t for t in r.tokens)
            return replace(r, tokens=tuple(min(t, self.tb + 1500) for t in tokens))
        self._encode(s.audio, s.start)
        previous = self.agreement.previous or []
        hint = previous[len(committed):] if previous[: len(committed)] == committed else []
        return self.engine.decode(context + committed, timestamps=True, max_new=budget,
                                  max_repeats=self.options.max_repeats,
                                  hint=hint if temperature == 0 else (),
                                  temperature=temperature, seed=s.start)

    def _encode(self, audio: np.ndarray, start: int) -> None:
        """Encode the window unless the engine holds exactly this audio already (a fallback
        decode at another temperature reads the same encoder output)."""
        key = (start, audio.size)
        if key != self._encoded:
            self.engine.encode(audio)
            self._encoded = key

    def _trim_idle(self) -> None:
        """No open line: keep the context that is recent enough, or just the pre-roll."""
        now = self.s.start + self.s.audio.size
        keep_from = now - int(self.options.context_s * self.rate)
        self.s.context = [c for c in self.s.context if c.start >= keep_from]
        preroll = self.options.preroll_ms * self.rate // 1000
        front = self.s.context[0].start if self.s.context else now - preroll
        # the line and its context must fit the window with a step to spare
        front = max(front, now - (self.window - 2 * self.step))
        self.s.context = [c for c in self.s.context if c.start >= front]
        self._cut_front(front)

    def _cut_front(self, sample: int) -> None:
        """Drop audio before `sample`, in whole timestamp steps (committed timestamps move)."""
        steps = max(0, (sample - self.s.start) // STEP)
        if steps:
            self.s.audio = self.s.audio[steps * STEP:]
            self.s.start += steps * STEP
            self.agreement.rebase(steps)
