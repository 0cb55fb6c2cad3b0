"""Judging a decode and falling back when it fails, as the best Whisper runtimes do.

A window's decode fails when the loop guard ended it, when its text compresses too well (a
repetition the guard let through), or when its average log-probability is low. A failed window
is decoded again at rising temperatures with a seeded generator (so a run is reproducible); the
first decode that passes wins, and when none passes the best one that did not loop is kept. No
rule ever truncates a decode: the guard keeps every word before a loop, and a fallback decode
gives the model the chance to say what follows it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Callable

from edgestream.runtime.decode import GreedyResult


@dataclass(frozen=True)
class QualityRules:
    """Thresholds: openai-whisper's and faster-whisper's defaults."""

    compression_ratio_max: float = 2.4
    avg_logprob_min: float = -1.0
    no_speech_min: float = 0.6  # with a low avg log-probability: the window holds no speech
    temperatures: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


@dataclass(frozen=True)
class Judged:
    """A decode, its text and what (if anything) is wrong with it."""

    result: GreedyResult
    text: str
    temperature: float
    problems: tuple[str, ...]
    silent: bool = False  # the model says the audio holds no speech: keep no text

    @property
    def ok(self) -> bool:
        return not self.problems


def judge(result: GreedyResult, text: str, temperature: float, rules: QualityRules) -> Judged:
    problems = []
    if result.looped:
        problems.append("loop")
    # a repetition the timestamp guard already timed against the audio (it spans the audio at
    # the pace of speech, so the decode went on) is a phrase really said again and again: the
    # compression ratio, blind to time, would only punish the words for being repeated
    timed_repeat = result.guarded and not result.looped
    if compression_ratio(text) > rules.compression_ratio_max and not timed_repeat:
        problems.append("compression")
    if result.logprobs and result.avg_logprob < rules.avg_logprob_min:
        problems.append("logprob")
    return Judged(result, text, temperature, tuple(problems))


def decode_with_fallback(decode: Callable[[float], GreedyResult], text: Callable[[GreedyResult],
                         str], rules: QualityRules,
                         no_speech: Callable[[GreedyResult], float] | None = None) -> Judged:
    """`decode(temperature)` at 0 first, then at each fallback temperature until one passes.

    `no_speech(result)`: the model's probability that the audio holds no speech (Whisper). When
    the greedy decode says "no speech" and is unsure of its words, the audio is silence and no
    fallback runs (a fallback on noise only finds a more confident hallucination); when every
    decode fails and the model said "no speech", it is silence too."""
    first = decode(0.0)
    tried = [judge(first, text(first), 0.0, rules)]
    said_none = no_speech is not None and no_speech(first) > rules.no_speech_min
    if said_none and first.avg_logprob < rules.avg_logprob_min:
        return replace(tried[0], silent=True)
    for t in rules.temperatures:
        if tried[-1].ok:
            break
        result = decode(t)
        tried.append(judge(result, text(result), t, rules))
    if tried[-1].ok:
        return tried[-1]
    if said_none:
        return replace(tried[0], silent=True)
    unlooped = [j for j in tried if "loop" not in j.problems]
    return max(unlooped, key=lambda j: j.result.avg_logprob) if unlooped else tried[0]
