"""Guards that keep the words: a phrase really said six times is written six times and what
follows it is kept (offline and streaming), a repetition faster than speech is a loop, and noise
at speech level that passes the VAD produces no text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import references, speech_dir
from edgestream.export.wer import normalize, word_error_rate
from edgestream.runtime import load
from edgestream.runtime.audio.wav import read_wav, to_mono
from edgestream.runtime.families.whisper.engine import _SegmentLoopGuard

pytestmark = pytest.mark.slow
RATE = 16000
CLIP = "repeats_beckett.wav"  # the first 1.3 s of arctic_a0009 six times, then beckett.wav
BECKETT = "ever tried ever failed no matter try again fail again fail better"


def check_keeps_the_words(text: str) -> None:
    words = " ".join(normalize(text))
    # every repeat, none cut by a loop guard and none written twice
    assert words.count("turned sharply") == 6, text
    assert BECKETT in words, text  # and everything that follows the repeats
    assert word_error_rate([references()[CLIP]], [text]) <= 0.03, text


def test_transcribe_keeps_every_repeat_and_what_follows(real_bundle: Path) -> None:
    audio = to_mono(read_wav(speech_dir() / CLIP).samples)
    check_keeps_the_words(load(real_bundle, provider="cpu").transcribe(audio, RATE))


def test_streaming_keeps_every_repeat_and_what_follows(real_bundle: Path) -> None:
    audio = to_mono(read_wav(speech_dir() / CLIP).samples)
    stream = load(real_bundle, provider="cpu").stream()
    events = [e for i in range(0, audio.size, 2048) for e in stream.feed(audio[i: i + 2048],
                                                                          RATE)]
    events += stream.finish()
    check_keeps_the_words(" ".join(e.text for e in events if e.type == "final"))


def noise(kind: str, seconds: float, dbfs: float, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(int(seconds * RATE))
    if kind == "brown":  # integrated white noise, its drift removed: rumble-like, speech-band
        x = np.cumsum(x)
        x -= np.convolve(x, np.ones(400) / 400, mode="same")
    return (x / np.sqrt(np.mean(x ** 2)) * 10 ** (dbfs / 20)).astype(np.float32)


@pytest.mark.parametrize("kind", ["white", "brown"])
@pytest.mark.parametrize("dbfs", [-30.0, -20.0, -12.0])
def test_noise_at_speech_level_gives_no_text(real_bundle: Path, kind: str, dbfs: float) -> None:
    model = load(real_bundle, provider="cpu")
    audio = noise(kind, 6.0, dbfs)
    assert model.transcribe(audio, RATE) == ""
    stream = model.stream(vad="energy")  # the energy gate lets this noise through
    events = stream.feed(audio, RATE) + stream.finish()
    assert any(e.type == "speech_started" for e in events), "the VAD did not pass the noise"
    assert [e.text for e in events if e.type in ("partial", "final")] in ([""], []), events


def test_repetition_faster_than_speech_is_a_loop() -> None:
    """Timestamp-mode guard on token sequences (timestamps from 100, 20 ms each): a segment that
    repeats an n-gram more than 4 times is made to close; its closing timestamp decides."""
    guard = _SegmentLoopGuard(timestamp_begin=100, max_repeats=4, forced=[])
    phrase = [1, 2, 3]
    opened = [100] + phrase * 5
    assert guard.must_close(opened)
    assert not guard.must_close([100] + phrase * 4)
    # 15 tokens in 4 s: five times a spoken phrase
    assert not guard.runaway(opened + [100 + 200])
    # 15 tokens in 0.1 s: no one speaks that fast
    assert guard.runaway(opened + [100 + 5])
    # the runaway segment starts at its opening timestamp: everything before it is kept
    assert guard.segment_start([100, 7, 8, 150, 150] + phrase * 5 + [155]) == 4


def test_context_never_costs_a_line(real_bundle: Path) -> None:
    """One stream over two recordings: the second is read with the first as context, and not
    one of its lines comes out empty (forced context can make Whisper end its text early)."""
    first = to_mono(read_wav(speech_dir() / "arctic_a0009.wav").samples)
    second = to_mono(read_wav(speech_dir() / "two_cities.wav").samples)
    # cut after "incredulity": the quietest 50 ms between 12.8 and 13.8 s
    frames = second[int(12.8 * RATE): int(13.8 * RATE)].reshape(-1, 800)
    second = second[: int(12.8 * RATE) + 800 * int(np.argmin(np.square(frames).mean(axis=1)))]
    audio = np.concatenate([first, np.zeros(RATE, np.float32), second])
    stream = load(real_bundle, provider="cpu").stream()
    events = [e for i in range(0, audio.size, 2048) for e in stream.feed(audio[i: i + 2048],
                                                                          RATE)]
    finals = [e for e in events + stream.finish() if e.type == "final"]
    assert all(f.text for f in finals), finals
    reference = (references()["arctic_a0009.wav"] + " It was the best of times, it was the "
                 "worst of times, it was the age of wisdom, it was the age of foolishness, it "
                 "was the epoch of belief, it was the epoch of incredulity")
    assert word_error_rate([reference], [" ".join(f.text for f in finals)]) <= 0.08, finals


def test_a_timed_repetition_is_not_a_compression_failure() -> None:
    """A phrase said six times compresses like a loop; when the timestamp guard has timed it
    against the audio (the decode went on), only a real loop or a low score fails it."""
    from edgestream.runtime.decode import GreedyResult
    from edgestream.runtime.quality import QualityRules, judge

    text = " ".join(["He turned sharply and"] * 6) + " ever tried."
    tokens = tuple(range(40))
    rules = QualityRules()
    timed = GreedyResult(tokens, True, (-0.2,) * 40, guarded_at=0)
    assert judge(timed, text, 0.0, rules).ok
    untimed = GreedyResult(tokens, True, (-0.2,) * 40)  # no guard fired: a loop it missed
    assert judge(untimed, text, 0.0, rules).problems == ("compression",)
    runaway = GreedyResult(tokens, False, (-0.2,) * 40, looped=True, guarded_at=0)
    assert "compression" in judge(runaway, text, 0.0, rules).problems
    unsure = GreedyResult(tokens, True, (-1.5,) * 40, guarded_at=0)
    assert judge(unsure, text, 0.0, rules).problems == ("logprob",)


def test_a_hallucination_in_the_context_does_not_breed(real_bundle: Path) -> None:
    """An hour-long run once went wrong for minutes: a line hallucinated on a pause ("a") joined
    the context, Whisper copied it into the next lines ("a a a a"), and those joined the context
    too. Text that loops across lines, or that needed a hot fallback, clears the context."""
    from edgestream.runtime.families.whisper.policy import _Said

    stream = load(real_bundle, provider="cpu").stream()
    policy = stream.gate.policy
    tok = policy.tok

    def said(text: str, start_s: float) -> _Said:
        ids = tuple(tok.encode(" " + text, add_special_tokens=False).ids)
        return _Said(ids, int(start_s * RATE), int((start_s + 0.4) * RATE))

    # what the long run's context held: real lines, a tail hallucination, then "a" lines
    policy._remember([said("Fail again.", 0.0), said("Fail better.", 0.6)], trusted=True)
    kept = [policy._text(s.tokens) for s in policy.s.context]
    assert kept == ["Fail again.", "Fail better."]  # ordinary text joins the context
    for k in range(4):
        policy._remember([said("a", 1.2 + 0.4 * k)], trusted=True)
    assert len(policy.s.context) == 6  # four "a" in a row: not yet a loop (max_repeats 4)
    policy._remember([said("a", 3.0)], trusted=True)
    assert policy.s.context == []  # the fifth makes the loop: the context is cleared

    # a line repeated across lines in bigger pieces, and a line that needed a hot fallback
    sizes = []
    for k in range(5):
        policy._remember([said("He turned sharply and", 4.0 + k)], trusted=True)
        sizes.append(len(policy.s.context))
    assert sizes[-1] < 5 and any(b < a for a, b in zip(sizes, sizes[1:])), sizes  # cleared
    policy._remember([said("ok", 9.0)], trusted=False)
    policy._remember([said("It was the best of times,", 10.0)], trusted=True)
    assert len(policy.s.context) == 1
    policy._remember([said("it was the worst of times,", 11.0)], trusted=False)
    assert policy.s.context == []

    # and the words after a poisoned stretch come out right: feed a real clip into the stream
    for k in range(8):
        policy._remember([said("a", 0.4 * k)], trusted=True)
    audio = to_mono(read_wav(speech_dir() / "arctic_a0007.wav").samples)
    events = [e for i in range(0, audio.size, 2048) for e in stream.feed(audio[i: i + 2048],
                                                                          RATE)]
    text = " ".join(e.text for e in events + stream.finish() if e.type == "final")
    assert word_error_rate([references()["arctic_a0007.wav"]], [text]) <= 0.1, text
