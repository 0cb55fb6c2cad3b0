"""The library API: one model, many independent streams (interleaved, threaded), state per stream
not weights, speculative finals identical to the normal path, gaps, and clear errors for bad
options and bad audio."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import speech_dir
from edgestream.runtime import load
from edgestream.runtime.audio.wav import read_wav, to_mono
from edgestream.runtime.errors import AudioInputError, BundleError, OptionError

RATE = 16000
RANDOM = {"fallback": False, "max_repeats": 10**6, "vad": "energy"}  # raw greedy, random weights


def clip(name: str) -> np.ndarray:
    return to_mono(read_wav(speech_dir() / name).samples)


def digest(events: list) -> list[tuple]:
    """What a screen would show: kinds, lines, texts, reasons and times."""
    return [(e.type, getattr(e, "line", None), getattr(e, "text", None),
             getattr(e, "reason", None), round(e.t, 3)) for e in events]


def run_alone(model, audio: np.ndarray, block: int = 1024, **options) -> list:  # type: ignore[no-untyped-def]
    s = model.stream(**options)
    events = [e for i in range(0, audio.size, block) for e in s.feed(audio[i: i + block], RATE)]
    return events + s.finish()


def rss_bytes() -> int:
    for row in Path("/proc/self/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_two_streams_interleaved_equal_each_alone(tiny_moonshine_bundle: Path) -> None:
    model = load(tiny_moonshine_bundle, provider="cpu")
    a, b = clip("beckett.wav"), clip("arctic_a0007.wav")
    alone_a, alone_b = run_alone(model, a, **RANDOM), run_alone(model, b, **RANDOM)
    sa, sb = model.stream(**RANDOM), model.stream(**RANDOM)
    got_a: list = []
    got_b: list = []
    for i in range(0, max(a.size, b.size), 1024):
        if i < a.size:
            got_a += sa.feed(a[i: i + 1024], RATE)
        if i < b.size:
            got_b += sb.feed(b[i: i + 1024], RATE)
    got_a += sa.finish()
    got_b += sb.finish()
    assert any(e.type == "final" and e.text for e in alone_a)
    assert digest(got_a) == digest(alone_a)
    assert digest(got_b) == digest(alone_b)


def test_streams_fed_from_threads_equal_each_alone(tiny_moonshine_bundle: Path) -> None:
    model = load(tiny_moonshine_bundle, provider="cpu")
    clips = [clip("beckett.wav"), clip("arctic_a0009.wav"), clip("arctic_a0007.wav")]
    expected = [digest(run_alone(model, c, **RANDOM)) for c in clips]
    results: list[list] = [[] for _ in clips]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = digest(run_alone(model, clips[i], block=512, **RANDOM))
        except BaseException as e:  # reported below: a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(clips))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results == expected


def test_a_second_stream_costs_its_state_not_the_weights(real_bundle: Path) -> None:
    """Each further stream adds its state bytes plus at most 5 MB of resident memory. Resident
    memory is noisy (allocator arenas, onnxruntime's scratch buffers), so two further streams
    are added one after the other and the smaller growth is judged: a copy of the weights
    would show in both."""
    import gc

    model = load(real_bundle, provider="cpu", threads=2)
    audio = clip("arctic_a0009.wav")
    run_alone(model, audio)  # warm: sessions, arenas, caches
    run_alone(model, audio)
    kept = [model.stream()]  # the first stream stays alive
    run_alone(model, audio)
    growth = []
    for _ in range(2):
        gc.collect()
        before = rss_bytes()
        stream = model.stream()
        events = [e for i in range(0, audio.size, 1024)
                  for e in stream.feed(audio[i: i + 1024], RATE)]
        events += stream.finish()
        gc.collect()
        growth.append(rss_bytes() - before)
        kept.append(stream)
        assert any(e.type == "final" and e.text for e in events)
    state = kept[-1].state_bytes
    weights = sum((real_bundle / f).stat().st_size for f in ("encoder.onnx", "decoder.onnx"))
    assert state < weights / 4  # the bound below would not catch a weight copy otherwise
    assert min(growth) <= state + 5 * 2**20, (growth, state)


@pytest.mark.parametrize("name", ["beckett.wav", "two_cities.wav"])
def test_speculative_finals_equal_the_normal_path(real_bundle: Path, name: str) -> None:
    model = load(real_bundle, provider="cpu", threads=2)
    audio = clip(name)
    fast = model.stream()
    spec = run_alone(model, audio, **{})
    plain = run_alone(model, audio, speculative=False)
    finals = [(e.line, e.text, e.reason, e.start, e.end) for e in spec if e.type == "final"]
    assert finals == [(e.line, e.text, e.reason, e.start, e.end) for e in plain
                      if e.type == "final"]
    assert len(finals) >= 5
    del fast


def test_speculation_is_used_and_rolled_back(tiny_moonshine_bundle: Path) -> None:
    """Short pauses inside speech (200 ms) start a speculative final that speech discards; long
    ones (1 s) confirm it. The finals equal those of a run without speculation."""
    model = load(tiny_moonshine_bundle, provider="cpu")
    word = clip("arctic_a0009.wav")[: RATE]
    pieces = [word, np.zeros(RATE // 5, np.float32), word, np.zeros(RATE, np.float32), word,
              np.zeros(RATE, np.float32)]
    audio = np.concatenate(pieces)
    s = model.stream(speculate_ms=96, **RANDOM)
    events = [e for i in range(0, audio.size, 1280) for e in s.feed(audio[i: i + 1280], RATE)]
    events += s.finish()
    stats = s.stats_event().values
    plain = run_alone(model, audio, block=1280, speculative=False, speculate_ms=96, **RANDOM)
    assert [(e.text, e.start, e.end) for e in events if e.type == "final"] == \
        [(e.text, e.start, e.end) for e in plain if e.type == "final"]
    assert stats["speculative_used"] >= 1 and stats["speculative_discarded"] >= 1, stats
    assert stats["final_compute_ms_max"] < 5.0, stats  # the final was ready at the endpoint


def test_gap_finalizes_the_line_before_it(tiny_moonshine_bundle: Path) -> None:
    model = load(tiny_moonshine_bundle, provider="cpu")
    audio = clip("beckett.wav")
    s = model.stream(**RANDOM)
    events = s.feed(audio[: int(0.9 * RATE)], RATE)  # inside "Ever tried"
    events += s.gap(2.5)
    events += s.feed(audio[int(0.9 * RATE):], RATE) + s.finish()
    kinds = [e.type for e in events]
    gap = next(e for e in events if e.type == "gap")
    assert gap.t == pytest.approx(0.9, abs=0.01) and gap.duration == pytest.approx(2.5)
    before = [e for e in events[: kinds.index("gap")] if e.type == "final"]
    assert before and before[-1].reason == "gap" and before[-1].end <= gap.t + 1e-6
    after = [e for e in events[kinds.index("gap"):] if e.type == "final"]
    assert after and all(f.start >= gap.t + gap.duration - 1e-6 for f in after), after
    # stream time counts the hole: the stream ends 2.5 s later than the audio it was fed
    assert s.stats_event().t == pytest.approx(audio.size / RATE + 2.5, abs=0.01)
    assert s.stats_event().values["gaps"] == 1


def test_feed_any_rate_and_channels(tiny_moonshine_bundle: Path) -> None:
    model = load(tiny_moonshine_bundle, provider="cpu")
    audio = clip("arctic_a0007.wav")
    t48 = np.arange(audio.size * 3) / 48000
    stereo = np.interp(t48, np.arange(audio.size) / RATE, audio).astype(np.float32)
    stereo = np.stack([stereo, stereo], axis=1)
    s = model.stream(**RANDOM)
    events = [e for i in range(0, stereo.shape[0], 4800) for e in s.feed(stereo[i: i + 4800],
                                                                         48000)]
    events += s.finish()
    final = [e for e in events if e.type == "final"]
    assert final and final[-1].end == pytest.approx(audio.size / RATE, abs=0.5)


def test_option_errors_name_the_option(tiny_moonshine_bundle: Path, tiny_bundle: Path) -> None:
    moon = load(tiny_moonshine_bundle, provider="cpu")
    whisper = load(tiny_bundle, provider="cpu")
    with pytest.raises(OptionError, match="'step_ms' applies to whisper"):
        moon.stream(step_ms=300)
    with pytest.raises(OptionError, match="'partial_ms' applies to moonshine_streaming"):
        whisper.stream(partial_ms=300)
    with pytest.raises(OptionError, match="unknown stream option 'colour'"):
        whisper.stream(colour="red")
    with pytest.raises(OptionError, match="endpoint_ms=10"):
        whisper.stream(endpoint_ms=10)
    with pytest.raises(OptionError, match="vad='webrtc'"):
        whisper.stream(vad="webrtc")
    with pytest.raises(OptionError, match="threads=-1"):
        load(tiny_bundle, threads=-1)
    with pytest.raises(BundleError, match="bundle folder not found"):
        load(tiny_bundle / "nope")


def test_audio_errors_name_the_problem(tiny_bundle: Path) -> None:
    s = load(tiny_bundle, provider="cpu").stream()
    with pytest.raises(AudioInputError, match="int16.*divide 16-bit PCM by 32768"):
        s.feed(np.zeros(100, np.int16), RATE)
    with pytest.raises(AudioInputError, match="sample_rate=0"):
        s.feed(np.zeros(100, np.float32), 0)
    with pytest.raises(AudioInputError, match="NaN"):
        s.feed(np.full(100, np.nan, np.float32), RATE)
    s.feed(np.zeros(100, np.float32), RATE)
    with pytest.raises(AudioInputError, match="changed from 16000 to 8000"):
        s.feed(np.zeros(100, np.float32), 8000)
    s.finish()
    with pytest.raises(OptionError, match="finished"):
        s.feed(np.zeros(100, np.float32), RATE)
