"""Whisper on a bundle: encode one window, greedy-decode with static KV, optional timestamps.

Used by both `transcribe` (whole files, window by window) and the LocalAgreement streaming driver.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from edgestream.runtime.bundle import Bundle
from edgestream.runtime.errors import BundleError
from edgestream.runtime.decode import (GreedyResult, HeadRows, block_graph, greedy_decode,
                                       log_softmax, pick)
from edgestream.runtime.families.whisper.mel import WhisperLogMel
from edgestream.runtime.device_state import StepOutputs, make_states

_NEG = np.float32(-np.inf)


def repeats_too_often(tokens: Sequence[int], max_repeats: int) -> bool:
    """True when the tail of `tokens` is one n-gram (n <= 8) repeated more than `max_repeats` times:
    the classic Whisper loop on silence or noise."""
    return loop_start(tokens, max_repeats) is not None


def loop_start(tokens: Sequence[int], max_repeats: int) -> int | None:
    """Where the loop at the tail of `tokens` begins (see `repeats_too_often`), or None."""
    for n in range(1, 9):
        reps = max_repeats + 1
        if len(tokens) < n * reps:
            break
        tail = list(tokens[-n:])
        if all(list(tokens[len(tokens) - n * (r + 1): len(tokens) - n * r]) == tail
               for r in range(reps)):
            return len(tokens) - n * reps
    return None


class _SegmentLoopGuard:
    """The timestamp-mode loop guard of `WhisperEngine.decode` (see there)."""

    MAX_TOKENS_PER_S = 12.0  # fast speech is about 5 tokens/s; more than this is not speech

    def __init__(self, timestamp_begin: int, max_repeats: int, forced: Sequence[int]) -> None:
        self.tb = timestamp_begin
        self.max_repeats = max_repeats
        self.forced = list(forced)
        self.fired_at: int | None = None  # segment_start when must_close first overrode a choice

    def segment_start(self, generated: list[int]) -> int:
        """Index in `generated` of the open (or just closed) segment's opening timestamp."""
        seq = self.forced + generated
        end = len(seq) - 1 if seq and seq[-1] >= self.tb and len(seq) > 1 and \
            seq[-2] < self.tb else len(seq)
        i = end - 1
        while i >= 0 and seq[i] < self.tb:
            i -= 1
        return max(0, i - len(self.forced))

    def _run(self, generated: list[int]) -> list[int]:
        seq = self.forced + generated
        i = len(seq)
        while i > 0 and seq[i - 1] < self.tb:
            i -= 1
        return seq[i:]

    def closing(self, generated: list[int]) -> bool:
        """What `must_close` answers, without recording it."""
        run = self._run(generated)
        return bool(run) and repeats_too_often(run, self.max_repeats)

    def must_close(self, generated: list[int]) -> bool:
        close = self.closing(generated)
        if close and self.fired_at is None:
            self.fired_at = self.segment_start(generated)
        return close

    def runaway(self, generated: list[int]) -> bool:
        """True once a segment closes after text faster than speech, or a run never closes."""
        seq = self.forced + generated
        if len(seq) >= 2 and seq[-1] >= self.tb and seq[-2] < self.tb:
            opening = self.segment_start(generated) + len(self.forced)
            if opening < len(seq) - 1 and seq[opening] >= self.tb:
                text = len(seq) - 1 - opening - 1
                seconds = (seq[-1] - seq[opening]) * 0.02
                return text > self.MAX_TOKENS_PER_S * max(seconds, 0.02) and \
                    repeats_too_often(seq[opening + 1: -1], self.max_repeats)
        # a segment that keeps repeating although it was told to close
        return repeats_too_often(self._run(generated), 4 * self.max_repeats)


class WhisperEngine:
    """Runs a whisper_window bundle: `encode(audio)` then `decode(...)`."""

    def __init__(self, bundle: Bundle) -> None:
        m = bundle.manifest
        if m.pipeline != "whisper_window":
            raise BundleError(f"{bundle.root}: pipeline {m.pipeline!r} is not a Whisper bundle")
        self.bundle = bundle
        self.encoder = bundle.sessions["encoder"]
        self.decoder = bundle.sessions["decoder"]
        self.block_graph, self.block_size = block_graph(bundle, "tokens")
        self.decoder_block = bundle.sessions.get(self.block_graph) if self.block_size > 1 else None
        mel_spec = self.encoder.spec.inputs[0]
        self.mel = WhisperLogMel(n_mels=mel_spec.shape[1], n_samples=m.audio.window_samples)
        # state on the execution device (IO binding) or in host arrays: `execution`
        self.states = make_states(m, bundle.sessions, ["encoder", "decoder", self.block_graph])
        sp = m.tokenizer.special
        missing = {"sot", "eot"} - set(sp)
        if missing or not {"encoder", "decoder"} <= set(bundle.sessions):
            raise BundleError(f"{bundle.root}/manifest.json: a Whisper bundle needs graphs encoder "
                              f"and decoder and tokenizer.special sot and eot (missing: "
                              f"{sorted(missing) or 'graphs'}); re-export the bundle")
        self.eot = sp["eot"]
        self.timestamp_begin = sp.get("timestamp_begin", 0)
        self.no_timestamps = sp.get("no_timestamps", -1)
        self.vocab = self.decoder.spec.output("logits").shape[-1]
        # bundles since issue 8: the decoder's greedy head returns the choice of each row
        self.has_head = self.decoder.spec.output("choice") is not None
        # ... and column 2 under the timestamp rules, fed their history (`_stamp_state`)
        self.has_timestamp_head = self.decoder.spec.input("timestamp_state") is not None
        self.t_max = m.decoding.max_tokens
        self._suppress = np.array(m.decoding.suppress, dtype=np.int64)
        self._suppress_begin = np.array(m.decoding.suppress_at_begin, dtype=np.int64)
        self.prompt = tuple(m.decoding.prompt)
        self.languages = dict(m.decoding.languages)
        self.sot = sp["sot"]
        self.detect = False  # detect the language of every encoded window (`configure`)
        self.language: str | None = next(
            (code for code, i in self.languages.items() if i in self.prompt), None)
        self.tokenizer = bundle.tokenizer
        self.sot_prev = sp.get("sot_prev", -1)
        # English-only checkpoints call it <|nocaptions|>, multilingual ones <|nospeech|>
        ids = [bundle.tokenizer.token_to_id(t) for t in ("<|nospeech|>", "<|nocaptions|>")]
        self.no_speech = next((i for i in ids if i is not None and i < self.vocab), -1)

    def configure(self, language: str | None = None, task: str = "transcribe") -> None:
        """Choose language and task at run time. Multilingual bundles: `language` None detects
        it from each encoded window (Whisper's own way: the most likely language token after
        <|startoftranscript|>); `task` is transcribe or translate (to English). English-only
        bundles take language None or "en" and task transcribe."""
        from edgestream.runtime.errors import OptionError

        sp = self.bundle.manifest.tokenizer.special
        if task not in ("transcribe", "translate"):
            raise OptionError(f"task={task!r}: use 'transcribe' or 'translate'")
        if not self.languages:
            if language not in (None, "en") or task != "transcribe":
                raise OptionError(f"{self.bundle.root}: this Whisper bundle is English-only; it "
                                  f"takes no language={language!r} or task={task!r} (export a "
                                  "multilingual model, e.g. builtin:whisper-base)")
            return
        if language is not None and language not in self.languages:
            raise OptionError(f"language={language!r} is not one this model knows; use one of "
                              f"{', '.join(sorted(self.languages))} or None to detect it")
        if task not in sp:
            raise BundleError(f"{self.bundle.root}/manifest.json: tokenizer.special lacks "
                              f"{task!r}; re-export the bundle")
        self.detect = language is None
        self.language = language
        lang = self.languages[language] if language else next(iter(self.languages.values()))
        tail = (self.no_timestamps,) if self.no_timestamps in self.prompt else ()
        self.prompt = (self.sot, lang, sp[task], *tail)

    def detect_language(self) -> str:
        """The most likely language of the encoded window (one decoder step)."""
        logits = self.step(self.sot, 0)
        codes = list(self.languages)
        ids = np.array([self.languages[c] for c in codes])
        return codes[int(np.argmax(logits[ids]))]

    @property
    def window_seconds(self) -> float:
        return self.bundle.manifest.audio.window_samples / self.bundle.manifest.audio.sample_rate

    def encode(self, audio: np.ndarray) -> None:
        """Compute the log-mel of up to one window of 16 kHz audio and fill the cross K/V."""
        mel = self.mel(audio)[None]
        self.states.run("encoder", {self.encoder.spec.inputs[0].name: mel})
        if self.detect:
            self.language = self.detect_language()
            self.prompt = (self.prompt[0], self.languages[self.language], *self.prompt[2:])

    def _run(self, graph: str, tokens: Sequence[int], position: int,
             stamps: Sequence[tuple[int, int]] = ()) -> StepOutputs:
        feeds = {"tokens": np.array([tokens], dtype=np.int64),
                 "position": np.array([position], dtype=np.int64)}
        if self.has_timestamp_head:  # one (kind, last timestamp) per row; zeros: unused
            state = np.zeros((1, len(tokens), 2), dtype=np.int64)
            if stamps:
                state[0] = stamps
            feeds["timestamp_state"] = state
        return self.states.run(graph, feeds, position)

    def step(self, token: int, position: int) -> np.ndarray:
        return self._run("decoder", [token], position).host("logits").reshape(-1, self.vocab)[0]

    def step_choice(self, token: int, position: int, first: bool,
                    stamps: tuple[int, int] | None = None) -> tuple[int, float] | np.ndarray:
        """One step through the greedy head: (id, log-probability) under the fixed rules without
        timestamps (`first`: the begin suppression too), or with `stamps` (`_stamp_state`) under
        the timestamp rules; the logits when every token was suppressed (the caller's rules
        then decide)."""
        out = self._run("decoder", [token], position, [stamps] if stamps else ())
        rows = HeadRows(out, lambda row, generated: 2 if stamps else int(first))
        chosen = rows.choice(0, [])
        return chosen if chosen is not None else rows.logits(0)

    def block(self, tokens: Sequence[int], position: int) -> np.ndarray:
        out = self._run(self.block_graph, tokens, position)
        return out.host("logits").reshape(len(tokens), self.vocab)

    def _stamp_state(self, seq: Sequence[int]) -> tuple[int, int]:
        """What the timestamp head needs of the history `seq` (after the prompt): the kind of
        its last two tokens (0 none yet, 1 text last, 2 a timestamp after text, 3 two
        timestamps or a lone opening one) and its last timestamp token (-1: none)."""
        tb = self.timestamp_begin
        if not seq:
            return 0, -1
        last = next((t for t in reversed(seq) if t >= tb), -1)
        if seq[-1] < tb:
            return 1, last
        return (3 if len(seq) < 2 or seq[-2] >= tb else 2), last

    def decode(self, forced: Sequence[int] = (), *, timestamps: bool = False,
               max_new: int | None = None, max_repeats: int = 4, hint: Sequence[int] = (),
               previous: Sequence[int] = (), temperature: float = 0.0, seed: int = 0,
               keep_logits: bool = False) -> GreedyResult:
        """Decode after the prompt and the `forced` prefix (teacher-forced); greedy, or sampled
        at `temperature` with a seeded generator (the quality fallback).

        `previous`: text tokens of what came before this window, given behind <|startofprev|>
        (Whisper's conditioning on previous text). Applies the generation config's suppression
        lists and, with `timestamps`, Whisper's timestamp grammar. `hint`: the previous
        hypothesis after `forced`, re-scored in block passes (same result, less compute).

        Loop guard: without timestamps, an n-gram repeated more than `max_repeats` times ends the
        decode (`looped`). With timestamps a repeat is only suspect inside one segment: the
        segment is then made to close, and its closing timestamp decides. Speech really said that
        often spans the audio, so the decode goes on; a repetition faster than speech is a loop,
        and the decode ends before that segment (`looped`), keeping every word before it.
        """
        prompt = list(self.prompt)
        if timestamps and prompt and prompt[-1] == self.no_timestamps:
            prompt = prompt[:-1]
        forced = list(forced)
        context: list[int] = []
        if previous and self.sot_prev >= 0:
            room = max(0, min(223, self.t_max // 2 - len(prompt) - len(forced) - 1))
            context = [self.sot_prev, *list(previous)[-room:]] if room else []
        prefix = context + prompt + forced
        limit = self.t_max - 1 if max_new is None else min(self.t_max - 1, len(prefix) + max_new)
        if len(prefix) >= limit:
            return GreedyResult((), False)
        rng = np.random.default_rng(seed) if temperature > 0 else None
        tb = self.timestamp_begin
        guard = _SegmentLoopGuard(tb, max_repeats, forced) if timestamps else None

        def choose(logits: np.ndarray, generated: list[int]) -> tuple[int, float]:
            scores = logits.astype(np.float32, copy=True)
            if self._suppress.size:
                scores[self._suppress] = _NEG
            if not generated and not forced and self._suppress_begin.size:
                scores[self._suppress_begin] = _NEG
            if timestamps:
                self._timestamp_rules(scores, forced + generated)
                if guard is not None and guard.must_close(generated):
                    scores[: tb] = _NEG  # close the suspect segment: its timestamp decides
            elif tb:
                scores[tb:] = _NEG
            if not np.isfinite(scores).any():  # the grammar left nothing: end the text here
                scores[self.eot] = 0.0
            return pick(scores, temperature, rng)

        def stop(generated: list[int]) -> bool:
            if guard is not None:
                return guard.runaway(generated)
            return repeats_too_often(generated, max_repeats)

        head = block_head = None
        if self.has_head and rng is None and (self.has_timestamp_head or not timestamps):
            def rule(generated: list[int]) -> tuple[bool, tuple[int, int] | None] | None:
                """(first, timestamp state) of the head's column for this history; None where
                the host decides (the loop guard forcing a segment to close)."""
                seq = forced + generated
                if not timestamps:
                    return not seq, None
                if guard is not None and guard.closing(generated):
                    return None
                return not seq, self._stamp_state(seq)

            def head(token: int, position: int, generated: list[int]
                     ) -> tuple[int, float] | np.ndarray:
                r = rule(generated)
                return self.step(token, position) if r is None else \
                    self.step_choice(token, position, *r)

            def block_head(tokens: Sequence[int], position: int,
                           histories: Sequence[list[int] | None]) -> HeadRows:
                rules = [rule(h) if h is not None else None for h in histories]
                out = self._run(self.block_graph, tokens, position,
                                [(r[1] if r and r[1] else (0, -1)) for r in rules])

                def column(row: int, generated: list[int]) -> int | None:
                    r = rules[row]  # what was fed for this row must be this history's rule
                    if r is None or rule(generated) != r:
                        return None
                    return 2 if r[1] is not None else int(r[0])
                return HeadRows(out, column)

        out = greedy_decode(self, prefix, choose, self.eot, limit, stop, hint=hint,
                            probe=len(context) if self.no_speech >= 0 else None,
                            keep_logits=keep_logits, head=head, block_head=block_head)
        if out.looped and guard is not None:
            # drop the runaway segment (from its opening timestamp), keep every word before it
            keep = guard.segment_start(list(out.tokens))
            out = GreedyResult(out.tokens[:keep], False, out.logprobs[:keep], out.probe, True,
                               out.logits)
        if guard is not None and guard.fired_at is not None:
            out = replace(out, guarded_at=min(guard.fired_at, len(out.tokens)))
        return out

    def text_scores(self, result: GreedyResult) -> GreedyResult:
        """`result` judged on its words: timestamp and end tokens are near-certain formatting
        that would lift the average log-probability of a short hallucination ("you") over the
        quality threshold."""
        kept = tuple(lp for tok, lp in zip(result.tokens, result.logprobs) if tok < self.eot)
        return replace(result, logprobs=kept)

    def no_speech_probability(self, result: GreedyResult) -> float:
        """P(<|nocaptions|>) at the start of the transcript, 0 when the bundle cannot tell."""
        if result.probe is None or self.no_speech < 0:
            return 0.0
        return float(np.exp(log_softmax(result.probe.astype(np.float64))[self.no_speech]))

    def _timestamp_rules(self, scores: np.ndarray, seq: list[int]) -> None:
        """Whisper's timestamp grammar: timestamps come in pairs, never go backwards, start the
        text, and win when their total probability beats any single text token."""
        tb = self.timestamp_begin
        if self.no_timestamps >= 0:
            scores[self.no_timestamps] = _NEG
        last_ts = len(seq) >= 1 and seq[-1] >= tb
        penult_ts = len(seq) < 2 or seq[-2] >= tb
        if last_ts:
            if penult_ts:
                scores[tb:] = _NEG
            else:
                scores[: self.eot] = _NEG
        stamps = [t for t in seq if t >= tb]
        if stamps:
            # a closed pair may repeat its end as the next start; otherwise strictly increasing
            floor = stamps[-1] if (last_ts and not penult_ts) else stamps[-1] + 1
            scores[tb: min(floor, scores.size)] = _NEG
        if not seq:
            scores[: tb] = _NEG
            scores[tb + 51:] = _NEG  # first timestamp at most 1.0 s (50 steps of 20 ms)
        shifted = scores - scores.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        ts_mass = np.logaddexp.reduce(logprobs[tb:])
        if ts_mass > logprobs[:tb].max():
            scores[:tb] = _NEG

    def text_tokens(self, tokens: Sequence[int]) -> list[int]:
        return [t for t in tokens if t < self.eot]
