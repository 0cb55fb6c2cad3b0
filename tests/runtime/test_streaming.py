"""Streaming Whisper end to end on the real tiny.en bundle: `edgestream run` in-process over the
human clips (accuracy and event-order contract), `transcribe` accuracy, no decode on non-speech,
and a fake microphone (PortAudio faked, real PyAudio and MicSource) at real cadence."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from conftest import HUMAN_CLIPS, references, speech_dir
from edgestream.export.wer import normalize, word_error_rate
from edgestream.runtime import cli
from edgestream.runtime.families.whisper.engine import WhisperEngine

pytestmark = pytest.mark.slow

RATE = 16000


def run_cli(argv: list[str]) -> tuple[int, list[dict], str]:
    """`edgestream ARGV` in this process; returns the exit code, the JSON events, and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    events = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
    return rc, events, err.getvalue()


def write_wav(path: Path, audio: np.ndarray, rate: int = RATE) -> Path:
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def finals_of(events: list[dict]) -> list[dict]:
    return [e for e in events if e["type"] == "final"]


def check_event_contract(clip: str, events: list[dict]) -> None:
    """ready first, stats last; lines numbered 0, 1, ... each finalized once; partials and
    speech starts belong to the line being built; a final never takes back confirmed text."""
    assert events[0]["type"] == "ready" and events[-1]["type"] == "stats", clip
    finalized = 0  # finals so far = the line being built now
    confirmed: dict[int, str] = {}
    shown: set[int] = set()
    opened: set[int] = set()
    for e in events:
        if e["type"] == "speech_started":
            opened.add(e["line"])
        if e["type"] == "partial":
            shown.add(e["line"])
        if e["type"] in ("speech_started", "partial"):
            assert e["line"] == finalized, (clip, "event for a line already final", e)
        if e["type"] == "partial":
            assert e["text"] and e["text"].startswith(e["confirmed"]), (clip, e)
            before = confirmed.get(e["line"], "")
            assert e["confirmed"].startswith(before), (clip, "confirmed text changed", e)
            confirmed[e["line"]] = e["confirmed"]
        elif e["type"] == "final":
            assert e["line"] == finalized, (clip, "final out of order or repeated", e)
            assert e["reason"] in ("endpoint", "segment", "window", "end_of_input", "gap",
                                   "shutdown", "retracted"), (clip, e)
            # a line whose partial showed words ends with words, or says they were retracted
            if e["line"] in confirmed or e["line"] in shown:
                assert e["text"].strip() or e["reason"] == "retracted", (clip, e)
            assert e["text"].startswith(confirmed.get(e["line"], "")), \
                (clip, "the final dropped confirmed text", confirmed.get(e["line"]), e)
            assert 0.0 <= e["start"] < e["end"] <= e["t"] + 1e-6, (clip, e)
            finalized += 1
    lines = [f["line"] for f in finals_of(events)]
    assert lines == list(range(len(lines))) and len(set(lines)) == len(lines), (clip, lines)
    # every line that was opened or showed a partial ends with exactly one final
    assert all(line < finalized for line in opened | shown), (clip, opened, shown, finalized)


@pytest.fixture(scope="module")
def streamed(real_bundle: Path) -> dict[str, tuple[list[dict], float]]:
    """Each human clip through `edgestream run BUNDLE --input CLIP --jsonl` (fast, not paced)."""
    results = {}
    for clip in HUMAN_CLIPS:
        t0 = time.perf_counter()
        rc, events, err = run_cli(["run", str(real_bundle), "--input",
                                   str(speech_dir() / clip), "--jsonl"])
        assert rc == 0, err
        results[clip] = (events, time.perf_counter() - t0)
    return results


def test_run_streaming_wer_on_human_clips(streamed: dict[str, tuple[list[dict], float]]) -> None:
    refs = references()
    hyps = {clip: " ".join(f["text"] for f in finals_of(events))
            for clip, (events, _) in streamed.items()}
    per_clip = {clip: round(word_error_rate([refs[clip]], [hyps[clip]]), 3) for clip in hyps}
    wer = word_error_rate([refs[c] for c in HUMAN_CLIPS], [hyps[c] for c in HUMAN_CLIPS])
    assert wer <= 0.05, (wer, per_clip, hyps)
    # beckett's pauses make the endpointer cut several lines
    assert len(finals_of(streamed["beckett.wav"][0])) >= 3


def test_run_event_order_contract(streamed: dict[str, tuple[list[dict], float]]) -> None:
    for clip, (events, _) in streamed.items():
        check_event_contract(clip, events)
        assert any(e["type"] == "partial" for e in events), clip
        stats = events[-1]
        assert stats["audio_s"] == pytest.approx(
            (speech_dir() / clip).stat().st_size / 2 / RATE, abs=0.05)
        assert stats["mic_overruns"] == 0 and stats["dropped_blocks"] == 0


def test_event_times_never_go_backwards(streamed: dict[str, tuple[list[dict], float]]) -> None:
    """`t` is the stream time of the event: non-decreasing, and an endpoint final is only known
    once the trailing silence was heard, well after the speech ended."""
    for clip, (events, _) in streamed.items():
        times = [e["t"] for e in events]
        assert times == sorted(times), (clip, [(e["type"], e["t"]) for e in events])
        for f in finals_of(events):
            if f["reason"] == "endpoint":
                assert f["t"] >= f["end"] + 0.3, (clip, f)


def test_transcribe_wer_on_human_clips(real_bundle: Path) -> None:
    refs = references()
    clips = [speech_dir() / c for c in HUMAN_CLIPS]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["transcribe", str(real_bundle), *map(str, clips)])
    assert rc == 0, err.getvalue()
    rows = dict(line.split("\t", 1) for line in out.getvalue().splitlines())
    assert list(rows) == [str(c) for c in clips]
    hyps = [rows[str(c)] for c in clips]
    wer = word_error_rate([refs[c.name] for c in clips], hyps)
    assert wer <= 0.02, (wer, hyps)


@pytest.mark.parametrize("vad", ["auto", "energy"])
@pytest.mark.parametrize("kind", ["digital_silence", "noise_-60dBFS"])
def test_no_caption_and_no_decode_on_non_speech(real_bundle: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, kind: str,
                                                 vad: str) -> None:
    if kind == "digital_silence":
        audio = np.zeros(20 * RATE, dtype=np.float32)
    else:
        rng = np.random.default_rng(0)
        audio = (rng.standard_normal(20 * RATE) * 10 ** (-60 / 20)).astype(np.float32)
    clip = write_wav(tmp_path / f"{kind}.wav", audio)
    calls = {"encode": 0, "decode": 0}
    encode, decode = WhisperEngine.encode, WhisperEngine.decode

    def counting_encode(self: WhisperEngine, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["encode"] += 1
        return encode(self, *args, **kwargs)

    def counting_decode(self: WhisperEngine, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["decode"] += 1
        return decode(self, *args, **kwargs)

    monkeypatch.setattr(WhisperEngine, "encode", counting_encode)
    monkeypatch.setattr(WhisperEngine, "decode", counting_decode)
    rc, events, err = run_cli(["run", str(real_bundle), "--input", str(clip), "--jsonl",
                               "--vad", vad])
    assert rc == 0, err
    types = [e["type"] for e in events]
    assert types == ["ready", "stats"], events
    assert calls == {"encode": 0, "decode": 0}
    assert events[-1]["audio_s"] == pytest.approx(20.0, abs=0.05)


# A fake microphone end to end.

MIC_RATE = 48000


@pytest.fixture
def beckett_48k_int16() -> np.ndarray:
    """beckett.wav (16 kHz int16) at 48 kHz by linear interpolation: independent of the runtime's
    resampler, and band-limited enough for speech below 8 kHz."""
    with wave.open(str(speech_dir() / "beckett.wav"), "rb") as w:
        assert w.getframerate() == RATE and w.getnchannels() == 1 and w.getsampwidth() == 2
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)
    t48 = np.arange(pcm.size * 3) / MIC_RATE
    return np.round(np.interp(t48, np.arange(pcm.size) / RATE, pcm)).astype(np.int16)


@pytest.fixture
def clip_mic(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """install(clip, blocks): a fake PortAudio whose 48 kHz USB mic plays `clip` (int16, then
    zeros) at real cadence and is unplugged after `blocks` callbacks."""
    pyaudio = pytest.importorskip("pyaudio", reason="pyaudio is not installed "
                                                    "(pip install 'edgestream[mic]')")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fake_portaudio import FakeDevice, FakePortAudio

    class ClipPortAudio(FakePortAudio):
        def __init__(self, clip: np.ndarray, blocks: int) -> None:
            super().__init__([FakeDevice("HDA Intel PCH: HDMI 0 (hw:0,3)", 0, 44100.0,
                                         max_output_channels=2),
                              FakeDevice("Fake USB Mic (hw:1,0)", 1, float(MIC_RATE),
                                         supported_rates=(MIC_RATE,))],
                             default_input=1, unplug_after_blocks=blocks)
            self.clip = clip

        def signal(self, start_frame: int, frames: int, channels: int,
                   rate: int) -> np.ndarray:
            out = np.zeros((frames, channels), dtype=np.int16)
            piece = self.clip[start_frame: start_frame + frames]
            out[: piece.size] = piece[:, None]
            return out

    def install(clip: np.ndarray, blocks: int) -> FakePortAudio:
        fake = ClipPortAudio(clip, blocks)
        monkeypatch.setattr(pyaudio, "pa", fake)
        return fake

    return install


def mic_defaults() -> tuple[int, int]:
    from edgestream.runtime.audio.mic import MicSource

    params = inspect.signature(MicSource).parameters
    return params["block_frames"].default, params["queue_blocks"].default


def test_fake_microphone_end_to_end(real_bundle: Path, clip_mic,  # type: ignore[no-untyped-def]
                                    beckett_48k_int16: np.ndarray) -> None:
    clip = beckett_48k_int16
    block, _ = mic_defaults()
    tail = MIC_RATE  # 1 s of silence after the clip so the endpointer closes the last line
    blocks = -(-(clip.size + tail) // block)
    fake = clip_mic(clip, blocks)
    seconds = blocks * block / MIC_RATE
    t0 = time.monotonic()
    rc, events, err = run_cli(["run", str(real_bundle), "--input", "mic", "--device",
                               "fake usb", "--jsonl"])
    elapsed = time.monotonic() - t0
    # the run ends by itself once the device is unplugged, with the lost-device exit code
    assert rc == 3, err
    stream = fake.streams[-1]
    assert stream.frames_per_buffer == block and stream.rate == MIC_RATE and not stream.open
    assert stream.calls == blocks
    # the callback only queues bytes: it returns at once, and always within its block period
    # even while the main thread computes (its time includes waiting for the GIL)
    durations = np.array(stream.callback_durations)
    assert not stream.callback_errors and np.median(durations) < 0.001
    assert durations.max() < block / MIC_RATE, durations.max()
    assert fake.initialized == 0  # every PortAudio session was terminated
    assert events[0]["type"] == "ready" and "Fake USB Mic" in events[0]["input"]
    assert f"{MIC_RATE} Hz" in events[0]["input"]  # captured at the device rate, resampled
    check_event_contract("mic", events)
    text = " ".join(normalize(" ".join(f["text"] for f in finals_of(events))))
    assert "fail better" in text, events
    stats = events[-1]
    assert stats["mic_overruns"] == 0
    delivered = blocks - stats["dropped_blocks"]
    assert stats["audio_s"] == pytest.approx(delivered * block / MIC_RATE, abs=0.05), stats
    # the run queues ~10 s of capture: a slow decode delays captions, it never drops audio
    assert stats["dropped_blocks"] == 0, stats
    assert word_error_rate([references()["beckett.wav"]], [text]) <= 0.1, text
    # real cadence: the run cannot end before the device stops delivering, and it must not
    # trail far behind it either (the driver decodes less often when it falls behind)
    assert seconds - 0.2 <= elapsed <= seconds + 8.0, (elapsed, seconds, stats)


def test_lost_microphone_is_reported(real_bundle: Path, clip_mic) -> None:  # type: ignore[no-untyped-def]
    block, _ = mic_defaults()
    clip_mic(np.zeros(0, dtype=np.int16), MIC_RATE // block)  # 1 s of silence, then unplugged
    rc, events, err = run_cli(["run", str(real_bundle), "--input", "mic", "--device",
                               "fake usb", "--jsonl"])
    assert rc == 3, err  # a lost device is a failure the service manager restarts on
    assert events[-1]["type"] == "stats"
    assert any(e["type"] in ("notice", "error") and ("lost" in json.dumps(e).lower()
                                                     or "Fake USB Mic" in json.dumps(e))
               for e in events), events
