"""The microphone in the field: faults injected at the PortAudio boundary (the real PyAudio
classes over a fake C module) while the real loop streams a real bundle."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pyaudio = pytest.importorskip("pyaudio", reason="pyaudio is not installed (pip install 'edgestream[mic]')")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from fake_portaudio import FakeDevice, FakePortAudio  # noqa: E402

from edgestream.runtime.api import load  # noqa: E402
from edgestream.runtime.audio.field_mic import ReopeningMic  # noqa: E402
from edgestream.runtime.audio.resample import StreamingResampler  # noqa: E402
from edgestream.runtime.audio.wav import read_wav  # noqa: E402
from edgestream.runtime.events.sinks import SinkSet  # noqa: E402
from edgestream.runtime.events.types import to_json  # noqa: E402
from edgestream.runtime.loop import LoopConfig, LoopStatus, StopFlag, run_loop  # noqa: E402
from conftest import references, speech_dir  # noqa: E402
from edgestream.export.wer import word_error_rate  # noqa: E402

MIC_RATE = 48000
USB = FakeDevice("Fake USB Mic (hw:1,0)", 1, float(MIC_RATE), supported_rates=(MIC_RATE,))
GONE = FakeDevice("HDA Intel PCH: HDMI 0 (hw:0,3)", 0, 44100.0, max_output_channels=2)


def clip_48k(name: str, silence_s: float = 1.5) -> np.ndarray:
    wav = read_wav(speech_dir() / name)
    mono = wav.samples.mean(axis=1)
    up = StreamingResampler(wav.sample_rate, MIC_RATE)
    audio = np.concatenate([up.process(mono), up.flush(), np.zeros(int(silence_s * MIC_RATE))])
    return np.clip(np.round(audio * 32767), -32768, 32767).astype(np.int16)


class TwoClipPortAudio(FakePortAudio):
    """The first stream plays `first`, a stream opened after a replug plays `second`; block
    indices in `overflow_blocks` carry PortAudio's input-overflow flag."""

    def __init__(self, first: np.ndarray, second: np.ndarray, overflow_blocks: set[int]) -> None:
        super().__init__([GONE, USB], default_input=1,
                         status_for_block=lambda i: pyaudio.paInputOverflow
                         if i in overflow_blocks else 0)
        self.clips = [first, second]

    def signal(self, start_frame: int, frames: int, channels: int, rate: int) -> np.ndarray:
        clip = self.clips[min(len(self.streams), 2) - 1]
        out = np.zeros((frames, channels), dtype=np.int16)
        piece = clip[start_frame: start_frame + frames]
        out[: piece.size] = piece[:, None]
        return out


class ListSink:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def emit(self, event) -> None:  # type: ignore[no-untyped-def]
        import json

        self.events.append(json.loads(to_json(event)))


def test_device_lost_and_back_keeps_the_service_running(real_bundle: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = clip_48k("beckett.wav"), clip_48k("arctic_a0007.wav")
    fake = TwoClipPortAudio(first, second, overflow_blocks={5, 6, 7})
    monkeypatch.setattr(pyaudio, "pa", fake)
    model = load(real_bundle, "cpu")
    stream = model.stream(live=True)
    source = ReopeningMic("fake usb", model.sample_rate, block_ms=64, backlog_s=10.0,
                          backoff_s=(0.2, 0.4))
    sink = ListSink()
    sinks = SinkSet([sink])
    status = LoopStatus()
    stop = StopFlag()
    beats: list[float] = []
    result: list[int] = []
    loop = threading.Thread(target=lambda: result.append(run_loop(
        source, stream, sinks, LoopConfig(live=True), stop, status,
        heartbeat=lambda: beats.append(time.monotonic()))))
    loop.start()
    # unplug in the middle of "No matter" (3.2-4.4 s into the clip), with the device gone
    # from PortAudio's list so the reopen has to wait and retry
    time.sleep(3.9)
    fake.devices[1] = GONE
    fake.unplug()
    lost_at = time.monotonic()
    time.sleep(2.0)
    assert not status.mic_up and status.running  # still running, waiting for the device
    waiting_beats = [b for b in beats if lost_at + 0.5 < b < lost_at + 2.0]
    fake.devices[1] = USB  # plugged back in: the second clip plays
    back_at = time.monotonic()
    deadline = back_at + 30
    while time.monotonic() < deadline and not (status.mic_up and source.counters()["blocks"] > 0
                                               and stream.gate.line >= 4 and
                                               time.monotonic() - back_at > second.size / MIC_RATE + 1):
        time.sleep(0.1)
    stop.set()
    loop.join(30)
    sinks.close()
    assert result == [0]
    events = sink.events
    kinds = [(e["type"], e.get("kind") or e.get("reason")) for e in events
             if e["type"] in ("notice", "final", "gap")]
    lost = kinds.index(("notice", "mic_lost"))
    restored = kinds.index(("notice", "mic_restored"))
    # the open line was finalized at the loss, before the device came back
    assert ("final", "mic_lost") in kinds[lost:restored], kinds
    gap = next(e for e in events if e["type"] == "gap")
    assert 1.5 < gap["duration"] < 4.0, gap  # the hole, measured on the wall clock
    # no line spans the hole: every final ends before the gap starts or starts after it ends
    for f in (e for e in events if e["type"] == "final"):
        assert f["end"] <= gap["t"] + 0.05 or f["start"] >= gap["t"] + gap["duration"] - 0.05, f
    before = " ".join(e["text"] for e in events[:events.index(gap)] if e["type"] == "final")
    after = " ".join(e["text"] for e in events[events.index(gap):] if e["type"] == "final")
    assert "tried" in before.lower() and "failed" in before.lower(), before
    assert word_error_rate([references()["arctic_a0007.wav"]], [after]) <= 0.35, after
    # the loop stayed alive while it waited for the device: heartbeats kept coming
    assert len(waiting_beats) >= 4, waiting_beats
    stats = [e for e in events if e["type"] == "stats"][-1]
    # PortAudio flagged blocks 5-7 of each of the two streams as overflowed: all counted
    assert stats["mic_overruns"] == 6
    assert source.reopens == 1 and fake.initialized == 0  # every PortAudio session released
