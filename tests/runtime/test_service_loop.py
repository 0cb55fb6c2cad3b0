"""The device loop as a service manager and a pipeline see it.

- Stop signals: SIGTERM and the first Ctrl-C finalize the line being spoken and exit 0 within
  about one decode; a second Ctrl-C exits at once with 130. These run the installed console script
  as a subprocess and send it real signals.
- Readers: a closed pipe ends the run quietly; a slow reader neither slows the audio loop nor
  loses finals (partials may be dropped, and are counted).
- Faults: an exception in a step is a fatal `error` event and exit code 1.
- `transcribe --format`: SRT and WebVTT files that follow their format rules, JSON whose
  segments add up to its text, and a transcript that matches the reference text.
- Statistics in bounded memory that agree with numpy.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pytest

from conftest import references, speech_dir, validate_event
from edgestream.export.wer import word_error_rate
from edgestream.runtime import cli, load
from edgestream.runtime.api import Model
from edgestream.runtime.audio.sources import FileSource
from edgestream.runtime.events.sinks import SinkSet
from edgestream.runtime.events.stats import Histogram, StreamStats
from edgestream.runtime.events.types import Event, Final, Partial, Stats
from edgestream.runtime.families.whisper.policy import WhisperPolicy
from edgestream.runtime.gate import Hypothesis
from edgestream.runtime.loop import LoopConfig, run_loop

EDGESTREAM = Path(sys.executable).with_name("edgestream")
CLIPS = ("beckett.wav", "two_cities.wav")
SLOW_READER_S = 0.2  # seconds a slow sink takes per event


def clip_seconds(path: Path) -> float:
    with wave.open(str(path), "rb") as w:
        return w.getnframes() / w.getframerate()


def run_cli(argv: list[str]) -> tuple[int, list[dict], str]:
    """`edgestream ARGV` in this process; returns the exit code, the JSON events, and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    events = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
    return rc, events, err.getvalue()


# `edgestream run` as a subprocess, with its events read as they arrive.

class Run:
    """`edgestream ARGS` as a subprocess. A thread reads stdout line by line as it is written;
    every line is checked against the event schema as the test takes it."""

    def __init__(self, workdir: Path, *args: object) -> None:
        if not EDGESTREAM.is_file():
            pytest.skip(f"console script not installed at {EDGESTREAM} (pip install -e .)")
        self.stderr_path = workdir / "stderr.txt"
        env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([str(EDGESTREAM), *map(str, args)],
                                         stdout=subprocess.PIPE, stderr=err, env=env)
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self.events: list[dict] = []
        self._ended = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _take(self, timeout: float) -> dict | None:
        line = self._lines.get(timeout=timeout)
        if line is None:
            self._ended = True
            return None
        event = json.loads(line.decode("utf-8"))
        validate_event(event)
        self.events.append(event)
        return event

    def wait_for(self, wanted: Callable[[dict], bool], timeout: float = 180.0) -> dict:
        """The first event (from now on) for which `wanted` is true."""
        deadline = time.monotonic() + timeout
        while not self._ended:
            event = self._take(max(0.0, deadline - time.monotonic()))
            if event is not None and wanted(event):
                return event
        pytest.fail(f"the run ended without the awaited event; rc {self.proc.wait()}, "
                    f"events {self.events}, stderr {self.stderr()[-2000:]}")

    def signal_and_time_exit(self, *signals: tuple[float, int], timeout: float = 60.0
                             ) -> tuple[int, float]:
        """Send each (pause before, signal); returns the exit code and the seconds from the
        last signal to the process's exit."""
        for pause, signum in signals:
            time.sleep(pause)
            self.proc.send_signal(signum)
        sent = time.monotonic()
        rc = self.proc.wait(timeout=timeout)
        return rc, time.monotonic() - sent

    def rest(self) -> list[dict]:
        """Every event of the run, once the process has ended."""
        while not self._ended:
            self._take(timeout=30.0)
        return self.events

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


Spawn = Callable[..., Run]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """spawn(*args) -> Run; a run that a failing test left behind is killed afterwards."""
    runs: list[Run] = []

    def start(*args: object) -> Run:
        runs.append(Run(tmp_path, *args))
        return runs[-1]

    yield start
    for run in runs:
        run.kill()


# Stop signals.

@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT],
                         ids=["SIGTERM", "first_SIGINT"])
def test_stop_signal_mid_utterance_finalizes_the_line(real_bundle: Path, spawn: Spawn,
                                                      signum: int) -> None:
    clip = speech_dir() / "beckett.wav"
    run = spawn("run", real_bundle, "--input", clip, "--realtime", "--jsonl", "--provider", "cpu")
    partial = run.wait_for(lambda e: e["type"] == "partial")
    rc, took = run.signal_and_time_exit((0.0, signum))
    events = run.rest()
    err = run.stderr()
    assert rc == 0, (rc, err[-2000:])
    assert "Traceback" not in err, err[-2000:]

    after = [e for e in events[events.index(partial) + 1:] if e["type"] != "notice"]
    assert [e["type"] for e in after] == ["final", "stats"], after
    final, stats = after
    # the spoken line ends with its final: cut by the shutdown, or by an endpoint that the
    # gate had already decided before the stop was seen (then `finish` has no open line)
    assert final["line"] == partial["line"], (partial, final)
    assert final["reason"] in ("shutdown", "endpoint"), final
    assert final["text"].strip(), final  # the partial showed words: the final keeps some
    # capture stopped: far less audio was streamed than the clip holds
    assert stats["audio_s"] < clip_seconds(clip) - 3.0, stats

    # After the signal the process finishes the block in hand (at most 64 ms of pacing plus
    # one step: ~0.3 s on a busy machine), decodes the final once (no longer than the longest
    # step of this run, which decoded the same line's window for its partial), flushes the
    # events and tears down onnxruntime and the interpreter (0.5 s). A run that ignored the
    # signal would take the rest of the 10 s clip.
    bound = 0.3 + stats["step_ms_max"] / 1000.0 + 0.5
    assert took < bound, (took, bound, stats)


def test_second_sigint_exits_at_once(tiny_bundle: Path, spawn: Spawn) -> None:
    run = spawn("run", tiny_bundle, "--input", speech_dir() / "two_cities.wav", "--realtime",
                "--jsonl", "--provider", "cpu")
    run.wait_for(lambda e: e["type"] == "speech_started")  # the loop (and its handler) runs
    # Python runs signal handlers in the main thread between bytecodes and notes a pending
    # signal as a flag, so two SIGINTs sent back to back before the first is handled count as
    # one; 50 ms apart (faster than a person presses twice) both are seen.
    rc, took = run.signal_and_time_exit((0.0, signal.SIGINT), (0.05, signal.SIGINT))
    assert rc == 130, (rc, "the second SIGINT did not end the run", run.stderr()[-2000:])
    assert took < 1.0, took
    run.rest()  # what was written before the exit is still valid JSON lines


# Readers.

def test_closed_pipe_ends_the_run_cleanly(tiny_bundle: Path, tmp_path: Path) -> None:
    if not EDGESTREAM.is_file():
        pytest.skip(f"console script not installed at {EDGESTREAM} (pip install -e .)")
    err_path = tmp_path / "stderr.txt"
    # -v: the sink logs when it finds the reader gone, which shows that the run did write
    # after the reader closed its end (a run that had finished first would prove nothing)
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([str(EDGESTREAM), "-v", "run", str(tiny_bundle), "--input",
                                 str(speech_dir() / "two_cities.wav"), "--jsonl",
                                 "--provider", "cpu"], stdout=subprocess.PIPE, stderr=err)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        validate_event(json.loads(first))
        proc.stdout.close()
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err_path.read_text(errors="replace")
    assert rc == 0, (rc, stderr[-2000:])
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr[-2000:]
    assert "closed its end" in stderr, stderr[-2000:]


class Recorder:
    """A sink that keeps every event it is given, taking `delay` seconds for each."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        time.sleep(self.delay)
        self.events.append(event)


class TimedSinkSet(SinkSet):
    """The real SinkSet; also adds up how long its callers (the loop) waited in `emit`."""

    blocked_s = 0.0

    def emit(self, events: Iterable[Event]) -> None:
        started = time.perf_counter()
        super().emit(events)
        self.blocked_s += time.perf_counter() - started


def key(event: Event) -> tuple:
    """What identifies an event across two runs of the same audio (stats carry timings)."""
    if isinstance(event, Stats):
        return ("stats",)
    return tuple(vars(event).values())  # the event's fields, `type` last


@pytest.fixture(scope="module")
def tiny_model(tiny_bundle: Path) -> Model:
    return load(tiny_bundle, provider="cpu")


def stream_beckett(model: Model, sink: Recorder, capacity: int = 1000
                   ) -> tuple[float, TimedSinkSet]:
    """beckett.wav through `run_loop` as fast as it decodes; returns the seconds it took and
    the (still open) sinks."""
    sinks = TimedSinkSet([sink], capacity)
    started = time.perf_counter()
    # fallback off: the random model's finals fail every quality rule and would be re-decoded
    # at each temperature, which makes the run slow and its duration noisy
    code = run_loop(FileSource(speech_dir() / "beckett.wav"), model.stream(fallback=False),
                    sinks, LoopConfig())
    took = time.perf_counter() - started
    assert code == 0
    return took, sinks


def test_slow_reader_never_slows_the_loop(tiny_model: Model) -> None:
    fast = Recorder()
    fast_s, fast_sinks = stream_beckett(tiny_model, fast)
    fast_sinks.close()
    produced = [key(e) for e in fast.events]
    # a sink called in the loop would add this much to the run
    assert len(produced) * SLOW_READER_S >= 3.0, produced

    slow = Recorder(SLOW_READER_S)
    slow_s, sinks = stream_beckett(tiny_model, slow)
    assert sinks.blocked_s < 0.5, sinks.blocked_s
    assert slow_s < fast_s + 2.0, (slow_s, fast_s)
    sinks.close()
    received = [key(e) for e in slow.events]
    assert [k for k in received if k[-1] != "partial"] == \
        [k for k in produced if k[-1] != "partial"]
    assert received[-1] == ("stats",)
    partials = [k for k in produced if k[-1] == "partial"]
    assert sinks.dropped == len(partials) - sum(k[-1] == "partial" for k in received)


def test_full_queue_drops_partials_and_counts_them() -> None:
    """Bursts of partials (a decode faster than the reader) fill a small queue: the partials
    that find it full are dropped and counted; every final and the stats still arrive."""
    slow = Recorder(SLOW_READER_S)
    sinks = SinkSet([slow], capacity=4)
    sent: list[Event] = []
    for line in range(3):
        burst = [Partial(line, line + i / 100, f"words {i}", "") for i in range(40)]
        started = time.perf_counter()
        sinks.emit(burst)
        assert time.perf_counter() - started < 0.1  # partials never wait for room
        final = Final(line, line + 0.5, "words", "endpoint", line, line + 0.4)
        sinks.emit([final])
        sent += burst + [final]
    sent.append(Stats(3.0, StreamStats(16000).summary()))
    sinks.emit(sent[-1:])
    sinks.close()
    partials = [e for e in sent if isinstance(e, Partial)]
    kept = [e for e in slow.events if isinstance(e, Partial)]
    assert [e for e in slow.events if not isinstance(e, Partial)] == \
        [e for e in sent if not isinstance(e, Partial)]
    assert len(kept) < len(partials) and all(e in partials for e in kept)
    assert sinks.dropped == len(partials) - len(kept)


# Faults.

def test_step_exception_is_a_fatal_error_event(tiny_bundle: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    partial = WhisperPolicy.partial

    def fails_once(self: WhisperPolicy) -> Hypothesis:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return partial(self)

    monkeypatch.setattr(WhisperPolicy, "partial", fails_once)
    rc, events, err = run_cli(["run", str(tiny_bundle), "--input",
                               str(speech_dir() / "beckett.wav"), "--jsonl", "--provider", "cpu"])
    assert calls == 1, "the run never reached a partial decode, or went on after the fault"
    assert rc == 1, (rc, err)
    assert [e["type"] for e in events[-2:]] == ["error", "stats"], events
    error = events[-2]
    assert error["fatal"] is True and "boom" in error["message"], error


# transcribe --format.

SRT_TIME = r"(\d{2}):([0-5]\d):([0-5]\d),(\d{3})"
VTT_TIME = r"(?:(\d{2,}):)?([0-5]\d):([0-5]\d)\.(\d{3})"


def seconds(h: str | None, m: str, s: str, ms: str) -> float:
    return int(h or 0) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """SubRip: blocks separated by one blank line, each a counter from 1, a
    `HH:MM:SS,mmm --> HH:MM:SS,mmm` line and one or more non-blank text lines."""
    cues = []
    for n, block in enumerate(text.rstrip("\n").split("\n\n"), 1):
        lines = block.split("\n")
        assert lines[0] == str(n), (n, block)
        m = re.fullmatch(f"{SRT_TIME} --> {SRT_TIME}", lines[1])
        assert m, lines[1]
        assert len(lines) >= 3 and all(line.strip() for line in lines[2:]), block
        g = m.groups()
        cues.append((seconds(*g[:4]), seconds(*g[4:]), " ".join(lines[2:])))
    return cues


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    """WebVTT: a `WEBVTT` line, a blank line, then cues: an optional identifier, a
    `[HH:]MM:SS.mmm --> [HH:]MM:SS.mmm` line and text lines that never hold `-->`."""
    header, _, body = text.partition("\n\n")
    assert header == "WEBVTT", header
    cues = []
    for block in body.rstrip("\n").split("\n\n"):
        lines = block.split("\n")
        if "-->" not in lines[0]:
            lines = lines[1:]  # a cue identifier
        m = re.fullmatch(f"{VTT_TIME} --> {VTT_TIME}(?: .*)?", lines[0])
        assert m, lines[0]
        assert len(lines) >= 2 and all(line.strip() and "-->" not in line
                                       for line in lines[1:]), block
        g = m.groups()
        cues.append((seconds(*g[:4]), seconds(*g[4:]), " ".join(lines[1:])))
    return cues


@pytest.fixture(scope="module")
def subtitles(real_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two clips transcribed into one folder as .srt, .vtt and .json."""
    out = tmp_path_factory.mktemp("subtitles")
    for fmt in ("srt", "vtt", "json"):
        rc, _, err = run_cli(["transcribe", str(real_bundle),
                              *(str(speech_dir() / c) for c in CLIPS), "--format", fmt,
                              "--output-dir", str(out), "--provider", "cpu"])
        assert rc == 0, err
    return out


@pytest.mark.slow
@pytest.mark.parametrize("clip", CLIPS)
def test_transcribe_subtitle_files(subtitles: Path, clip: str) -> None:
    stem = Path(clip).stem
    duration = clip_seconds(speech_dir() / clip)
    srt = parse_srt((subtitles / f"{stem}.srt").read_text(encoding="utf-8"))
    assert srt, "no subtitle for a clip of speech"
    starts = [start for start, _, _ in srt]
    assert starts == sorted(starts), srt
    for start, end, _ in srt:
        assert 0.0 <= start < end <= duration + 0.001, (start, end, duration)

    vtt_text = (subtitles / f"{stem}.vtt").read_text(encoding="utf-8")
    assert vtt_text.startswith("WEBVTT"), vtt_text[:40]
    assert parse_vtt(vtt_text) == srt  # the same cues, written with '.' separators

    doc = json.loads((subtitles / f"{stem}.json").read_text(encoding="utf-8"))
    segments = doc["segments"]
    joined = " ".join(s["text"] for s in segments)
    assert joined.split() == doc["text"].split(), (joined, doc["text"])
    times = [t for s in segments for t in (s["start"], s["end"])]
    assert times == pytest.approx([t for a, b, _ in srt for t in (a, b)], abs=0.0015)

    ref = references()[clip]
    wer = word_error_rate([ref, ref], [doc["text"], " ".join(t for _, _, t in srt)])
    assert wer <= 0.05, (wer, doc["text"])


def test_subtitles_for_several_files_need_an_output_dir(tiny_bundle: Path) -> None:
    rc, _, err = run_cli(["transcribe", str(tiny_bundle),
                          *(str(speech_dir() / c) for c in CLIPS), "--format", "srt"])
    assert rc == 2, (rc, err)
    assert "--output-dir" in err, err


# Bounded statistics.

# The module's stated accuracy: a percentile is reported at the middle of its log-spaced
# bucket, "exact to about 5 %".
STATS_RTOL = 0.05
QUANTILES = (1, 10, 50, 90, 95, 99, 99.9)


def latencies(n: int, seed: int) -> np.ndarray:
    """Step times in ms as a service sees them: log-normal around 20 ms with a long tail."""
    return np.random.default_rng(seed).lognormal(mean=np.log(20.0), sigma=1.0, size=n)


def test_histogram_percentiles_agree_with_numpy() -> None:
    values = latencies(5000, seed=1)
    h = Histogram()
    for v in values.tolist():
        h.add(v)
    for q in QUANTILES:
        assert h.percentile(q) == pytest.approx(np.percentile(values, q), rel=STATS_RTOL), q
    assert h.n == values.size and h.max == values.max()
    assert h.total == pytest.approx(values.sum())


def test_histogram_memory_does_not_grow() -> None:
    h = Histogram()
    shape, footprint = h.counts.shape, sum(sys.getsizeof(v) for v in vars(h).values())
    values = latencies(1_000_000, seed=2)
    for v in values.tolist():
        h.add(v)
    for v in (0.0, 1e-9, 1e12):  # below and above the bucket range
        h.add(v)
    assert h.counts.shape == shape
    assert sum(sys.getsizeof(v) for v in vars(h).values()) == footprint
    assert int(h.counts.sum()) == h.n == values.size + 3
    for q in (50, 95, 99):
        assert h.percentile(q) == pytest.approx(np.percentile(values, q), rel=STATS_RTOL), q


def test_stream_stats_summary_after_a_long_run() -> None:
    rate, chunk = 16000, 1280  # 80 ms chunks
    steps = latencies(300_000, seed=3)  # 6.7 hours of audio
    finals = latencies(20_000, seed=4) * 10
    stats = StreamStats(rate)
    sizes = [h.counts.shape for h in (stats.step_ms, stats.eos_to_final_ms)]
    for ms in steps.tolist():
        stats.record(chunk, ms)
    for ms in finals.tolist():
        stats.record_final(ms, ms / 10)
    s = stats.summary(gaps=0)
    validate_event({"type": "stats", "t": s["audio_s"], **s})
    assert [h.counts.shape for h in (stats.step_ms, stats.eos_to_final_ms)] == sizes
    audio_s = steps.size * chunk / rate
    assert s["chunks"] == steps.size and s["audio_s"] == pytest.approx(audio_s)
    assert s["compute_s"] == pytest.approx(steps.sum() / 1000, abs=0.001)
    assert s["rtf"] == pytest.approx(steps.sum() / 1000 / audio_s, rel=1e-3)
    for q in (50, 95, 99):
        assert s[f"step_ms_p{q}"] == pytest.approx(np.percentile(steps, q), rel=STATS_RTOL), q
    assert s["step_ms_max"] == pytest.approx(steps.max(), abs=0.01)
    assert s["eos_to_final_ms_p50"] == pytest.approx(np.percentile(finals, 50), rel=STATS_RTOL)
    assert s["final_compute_ms_max"] == pytest.approx(finals.max() / 10, abs=0.1)
    assert s["gaps"] == 0


def test_stream_stats_summary_of_an_empty_stream() -> None:
    s = StreamStats(16000).summary()
    validate_event({"type": "stats", "t": 0.0, **s})
    assert (s["chunks"], s["audio_s"], s["rtf"], s["step_ms_p99"]) == (0, 0.0, 0.0, 0.0)
    assert "eos_to_final_ms_p50" not in s
