"""Endpointer decisions: EnergyVad on synthetic tone bursts (exact sample positions), and the
bundle's Silero VAD graph on real speech."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import speech_dir
from edgestream.runtime.bundle import Bundle
from edgestream.runtime.state import StateStore
from edgestream.runtime.vad import FRAME, EndpointConfig, Endpointer, EnergyVad, SileroVad, VadEvent
from edgestream.runtime.audio.wav import read_wav, to_mono

RATE = 16000


def tone(seconds: float, amplitude: float = 0.3, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(seconds * RATE))) / RATE
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(round(seconds * RATE)), dtype=np.float32)


def energy_endpointer(**config: int) -> Endpointer:
    return Endpointer(EnergyVad(-40.0), EndpointConfig(**config), RATE)


def feed_in_blocks(ep: Endpointer, audio: np.ndarray, sizes: list[int]) -> list[VadEvent]:
    events: list[VadEvent] = []
    pos = 0
    for size in sizes:
        events += ep.process(audio[pos: pos + size])
        pos += size
    events += ep.process(audio[pos:])
    return events


def random_sizes(rng: np.random.Generator, total: int) -> list[int]:
    sizes: list[int] = []
    while sum(sizes) < total:
        sizes.append(int(rng.choice([0, 1, 7, 100, 511, 512, 513, 1024, 1600, 4097, 16000])))
    return sizes


def test_start_and_end_of_a_tone_burst() -> None:
    speech_start, speech_end = 8000 + 123, 8000 + 123 + 16000  # 1 s tone, not frame aligned
    audio = np.concatenate([silence(0.5), np.zeros(123, np.float32), tone(1.0), silence(1.5)])
    ep = energy_endpointer()  # 96 ms to start, 640 ms to end
    events = ep.process(audio)
    assert [e.kind for e in events] == ["start", "end"]
    start, end = events
    # the start is the first frame holding tone: within one frame before the true onset
    assert speech_start - FRAME < start.sample <= speech_start
    assert start.sample % FRAME == 0
    # decided once min_speech_ms of speech frames were seen (96 ms = 3 frames)
    assert start.decided == start.sample + 3 * FRAME
    # the end is the end of the last frame holding tone
    last_frame_end = -(-speech_end // FRAME) * FRAME
    assert end.sample == last_frame_end
    assert speech_end <= end.sample < speech_end + FRAME
    # decided after endpoint_ms of silence frames: 640 ms = 20 frames of 32 ms
    assert end.decided == end.sample + 20 * FRAME
    assert abs((end.decided - end.sample) / RATE * 1000 - 640) < FRAME / RATE * 1000
    assert not ep.in_speech and ep.position == audio.size // FRAME * FRAME


def test_endpoint_ms_sets_the_end_delay() -> None:
    audio = np.concatenate([silence(0.2), tone(0.5), silence(1.0)])
    for endpoint_ms, frames in ((320, 10), (500, 16), (1000, 32)):
        ep = energy_endpointer(endpoint_ms=endpoint_ms)
        events = ep.process(audio)
        ends = [e for e in events if e.kind == "end"]
        if endpoint_ms <= 1000 - 32:
            assert len(ends) == 1 and ends[0].decided - ends[0].sample == frames * FRAME
        else:  # not enough trailing silence yet: still in speech
            assert ends == [] and ep.in_speech


def test_pause_shorter_than_endpoint_keeps_one_utterance() -> None:
    audio = np.concatenate([silence(0.3), tone(0.4), silence(0.4), tone(0.4), silence(1.0)])
    events = energy_endpointer(endpoint_ms=640).process(audio)
    assert [e.kind for e in events] == ["start", "end"]
    events = energy_endpointer(endpoint_ms=320).process(audio)
    assert [e.kind for e in events] == ["start", "end", "start", "end"]


def test_burst_shorter_than_min_speech_is_not_speech() -> None:
    # 30 ms touches at most two 32 ms frames wherever it falls: never 96 ms of speech frames
    for offset in (0, 100, 500):
        audio = np.concatenate([silence(0.5), np.zeros(offset, np.float32), tone(0.03),
                                silence(1.0), tone(0.02), silence(0.5)])
        ep = energy_endpointer(min_speech_ms=96)
        assert ep.process(audio) == []
        assert not ep.in_speech and ep.speech_frames >= 2
    # the same burst counts when min_speech_ms allows it
    audio = np.concatenate([np.zeros(16 * FRAME, np.float32), tone(0.064), silence(1.0)])
    assert [e.kind for e in energy_endpointer(min_speech_ms=64).process(audio)] == ["start", "end"]
    assert energy_endpointer(min_speech_ms=96).process(audio) == []


def test_quiet_noise_is_below_the_energy_gate() -> None:
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(RATE * 3) * 10 ** (-60 / 20)).astype(np.float32)  # -60 dBFS
    ep = energy_endpointer()
    assert ep.process(noise) == [] and ep.speech_frames == 0


def test_random_block_sizes_give_identical_events() -> None:
    rng = np.random.default_rng(1234)
    parts = [silence(0.37)]
    for _ in range(6):
        parts += [tone(float(rng.uniform(0.05, 1.2)), float(rng.uniform(0.05, 0.5))),
                  silence(float(rng.uniform(0.02, 1.0)))]
    audio = np.concatenate(parts + [silence(1.0)])
    reference = energy_endpointer().process(audio)
    assert len(reference) >= 4
    for trial in range(20):
        ep = energy_endpointer()
        assert feed_in_blocks(ep, audio, random_sizes(rng, audio.size)) == reference, trial
        assert ep.position == audio.size // FRAME * FRAME


# Silero VAD from an exported bundle.

@pytest.fixture(scope="module")
def silero(tiny_bundle: Path) -> SileroVad:
    bundle = Bundle.open(tiny_bundle)
    assert bundle.manifest.vad == "vad"
    return SileroVad(bundle.sessions["vad"], StateStore(bundle.manifest), RATE)


@pytest.fixture(scope="module")
def beckett() -> np.ndarray:
    wav = read_wav(speech_dir() / "beckett.wav")
    assert wav.sample_rate == RATE
    return to_mono(wav.samples)


def frame_probabilities(vad: SileroVad, audio: np.ndarray) -> np.ndarray:
    vad.reset()
    n = audio.size // FRAME
    return np.array([vad.frame_probability(audio[i * FRAME: (i + 1) * FRAME]) for i in range(n)])


def test_silero_probability_high_on_speech_low_on_silence(silero: SileroVad,
                                                          beckett: np.ndarray) -> None:
    p = frame_probabilities(silero, beckett)
    frames = beckett[: p.size * FRAME].reshape(p.size, FRAME)
    level = 20 * np.log10(np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1)) + 1e-12)
    loud = level > level.max() - 20  # clearly voiced frames
    quiet = level < -55.0  # the room between phrases (the clip's floor is about -65 dBFS)
    assert loud.sum() > 50 and quiet.sum() > 20
    assert np.median(p[loud]) > 0.8 and p.max() > 0.95
    assert np.median(p[quiet]) < 0.2
    assert 0.3 < (p >= 0.5).mean() < 0.8  # a reading with pauses, neither all nor nothing
    zeros = frame_probabilities(silero, silence(3.0))
    assert zeros.max() < 0.05
    # reset really restarts the recurrent state: the same audio gives the same probabilities
    np.testing.assert_allclose(frame_probabilities(silero, beckett), p, atol=1e-6)


def test_silero_endpointer_splits_beckett_into_utterances(silero: SileroVad,
                                                          beckett: np.ndarray) -> None:
    silero.reset()
    events = Endpointer(silero, EndpointConfig(), RATE).process(beckett)
    kinds = [e.kind for e in events]
    # "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better."
    assert kinds == ["start", "end"] * (len(kinds) // 2)
    assert 4 <= len(kinds) // 2 <= 8, events
    samples = [e.sample for e in events]
    assert samples == sorted(samples) and samples[0] > 0 and samples[-1] < beckett.size
    for start, end in zip(events[::2], events[1::2]):
        assert end.sample - start.sample >= 0.3 * RATE  # each a phrase, not a click
        assert end.decided - end.sample == 20 * FRAME
    # random block sizes: the same decisions (the recurrent state only sees whole frames)
    silero.reset()
    ep = Endpointer(silero, EndpointConfig(), RATE)
    assert feed_in_blocks(ep, beckett, random_sizes(np.random.default_rng(5), beckett.size)) \
        == events
