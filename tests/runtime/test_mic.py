"""MicSource and device lookup against a fake PortAudio C module under the real PyAudio classes."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pyaudio = pytest.importorskip("pyaudio", reason="pyaudio is not installed (pip install 'edgestream[mic]')")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_portaudio import FakeDevice, FakePortAudio, usb_and_default  # noqa: E402

from edgestream.runtime.audio import mic  # noqa: E402
from edgestream.runtime.errors import AudioDeviceError  # noqa: E402

USB, DEFAULT = 1, 2


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakePortAudio:
    fake = usb_and_default()
    monkeypatch.setattr(pyaudio, "pa", fake)
    return fake


def install(monkeypatch: pytest.MonkeyPatch, fake: FakePortAudio) -> FakePortAudio:
    monkeypatch.setattr(pyaudio, "pa", fake)
    return fake


def read_n(source: mic.MicSource, n: int, timeout: float = 5.0) -> list[np.ndarray]:
    blocks = []
    end = time.monotonic() + timeout
    while len(blocks) < n and time.monotonic() < end:
        block = source.read(timeout=0.5)
        if block is not None:
            blocks.append(block)
    return blocks


# Listing and lookup.

def test_lists_only_input_devices_with_names_decoded(fake: FakePortAudio) -> None:
    devices = mic.list_input_devices()
    assert devices == [
        mic.InputDevice(USB, "USB PnP Sound Device: Audio (hw:1,0)", 2, 48000.0, "ALSA", False),
        mic.InputDevice(DEFAULT, "default", 32, 44100.0, "ALSA", True),
    ]
    assert fake.initialized == 0  # every PyAudio() was terminated


def test_resolve_default_index_and_name(fake: FakePortAudio) -> None:
    assert mic.resolve_device(None).index == DEFAULT
    assert mic.resolve_device("Default").index == DEFAULT
    assert mic.resolve_device("1").index == USB
    assert mic.resolve_device("usb pnp").index == USB


def test_unknown_name_names_spec_and_lists_devices(fake: FakePortAudio) -> None:
    with pytest.raises(AudioDeviceError) as err:
        mic.resolve_device("Blue Yeti")
    text = str(err.value)
    assert "'Blue Yeti'" in text
    assert "USB PnP Sound Device" in text and "[2] default" in text
    assert "HDMI" not in text  # output-only devices are not offered
    assert "edgestream run BUNDLE --list-devices" in text


def test_index_of_output_only_device_is_not_found(fake: FakePortAudio) -> None:
    with pytest.raises(AudioDeviceError, match="'0' not found"):
        mic.resolve_device("0")


def test_ambiguous_name_lists_the_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakePortAudio([FakeDevice("USB Mic A (hw:1,0)", 1, 48000.0),
                                        FakeDevice("USB Mic B (hw:2,0)", 1, 48000.0),
                                        FakeDevice("pulse", 32, 44100.0)], default_input=2))
    with pytest.raises(AudioDeviceError) as err:
        mic.resolve_device("usb mic")
    text = str(err.value)
    assert "ambiguous" in text and "USB Mic A" in text and "USB Mic B" in text
    assert "pulse" not in text
    assert mic.resolve_device("mic b").index == 1


def test_no_capture_device_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, FakePortAudio([FakeDevice("HDMI", 0, 48000.0, max_output_channels=2)]))
    assert mic.list_input_devices() == []
    with pytest.raises(AudioDeviceError, match="No audio capture device was found"):
        mic.resolve_device(None)


def test_missing_pyaudio_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyaudio", None)
    with pytest.raises(AudioDeviceError) as err:
        mic.list_input_devices()
    assert "pip install 'edgestream[mic]'" in str(err.value)
    assert "portaudio19-dev" in str(err.value)


# Rate selection and opening.

def test_requested_rate_kept_when_supported(fake: FakePortAudio) -> None:
    source = mic.MicSource(mic.resolve_device("usb"), sample_rate=44100)
    assert source.sample_rate == 44100
    source.close()


def test_falls_back_to_device_rate_when_requested_rate_unsupported(fake: FakePortAudio) -> None:
    with mic.MicSource(mic.resolve_device("usb"), sample_rate=16000, channels=2) as source:
        assert source.sample_rate == 48000 and isinstance(source.sample_rate, int)
        assert fake.streams[-1].rate == 48000
        assert {c["rate"] for c in fake.format_checks} >= {16000, 48000}
    assert mic.MicSource(mic.resolve_device(None), sample_rate=16000).sample_rate == 16000


def test_too_many_channels_is_an_error(fake: FakePortAudio) -> None:
    with pytest.raises(AudioDeviceError, match="USB PnP.*2 input channel"):
        mic.MicSource(mic.resolve_device("usb"), channels=4)


def test_open_failure_names_device_rate_and_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    busy = FakeDevice("USB Mic (hw:1,0)", 1, 16000.0,
                      open_error=(pyaudio.paDeviceUnavailable, "Device unavailable"))
    fake = install(monkeypatch, FakePortAudio([busy], default_input=0))
    source = mic.MicSource(mic.resolve_device(None))
    with pytest.raises(AudioDeviceError) as err:
        source.start()
    text = str(err.value)
    assert "USB Mic (hw:1,0)" in text and "16000 Hz" in text and "1 ch" in text
    assert "Device unavailable" in text
    source.close()
    assert fake.initialized == 0


# Streaming.

def test_blocks_arrive_at_real_cadence_with_right_values(fake: FakePortAudio) -> None:
    block = 2400  # 50 ms at 48 kHz
    with mic.MicSource(mic.resolve_device("usb"), sample_rate=48000, channels=2,
                       block_frames=block) as source:
        t0 = time.monotonic()
        blocks = read_n(source, 10)
        elapsed = time.monotonic() - t0
    assert len(blocks) == 10
    assert 0.35 < elapsed < 1.5, f"0.5 s of audio took {elapsed:.3f} s"
    assert all(b.dtype == np.float32 and b.shape == (block, 2) for b in blocks)
    got = np.concatenate(blocks)
    expected = fake.signal(0, 10 * block, 2, 48000).astype(np.float32) / 32768.0
    np.testing.assert_allclose(got, expected, atol=1e-7)
    assert source.counters() == {"blocks": source.counters()["blocks"], "dropped_blocks": 0,
                                 "input_overflows": 0}
    assert source.counters()["blocks"] >= 10


def test_slow_consumer_drops_the_oldest_blocks_and_reports_the_gap(fake: FakePortAudio) -> None:
    with mic.MicSource(mic.resolve_device(None), sample_rate=16000, block_frames=160,
                       queue_blocks=4) as source:
        time.sleep(0.5)  # ~50 blocks of 10 ms while nobody reads
        counters = source.counters()
        first = source.read(timeout=1.0)
        gap = source.take_gap()
    stream = fake.streams[-1]
    assert counters["blocks"] >= 30
    assert counters["dropped_blocks"] >= counters["blocks"] - 5
    assert first is not None and first.shape == (160, 1)
    # the block read is a recent one, and the frames before it are reported lost
    assert gap >= (counters["blocks"] - 5) * 160 and gap % 160 == 0
    np.testing.assert_allclose(first[:, 0], fake.signal(gap, 160, 1, 16000)[:, 0] / 32768.0,
                               atol=1e-7)
    assert source.take_gap() == 0
    assert max(stream.callback_durations) < 0.005, max(stream.callback_durations)
    assert not stream.callback_errors


def test_input_overflow_flag_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = usb_and_default()
    fake.status_for_block = lambda i: pyaudio.paInputOverflow if i in (2, 5) else 0
    install(monkeypatch, fake)
    with mic.MicSource(mic.resolve_device(None), sample_rate=16000, block_frames=320) as source:
        assert len(read_n(source, 8)) == 8
        assert source.counters()["input_overflows"] == 2


def test_unplug_mid_stream_sets_lost_and_read_returns_none(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = usb_and_default()
    fake.unplug_after_blocks = 5
    install(monkeypatch, fake)
    with mic.MicSource(mic.resolve_device("usb"), block_frames=960) as source:
        blocks = list(source)  # ends by itself once the device is gone
        assert len(blocks) == 5
        assert source.lost
        t0 = time.monotonic()
        assert source.read(timeout=10.0) is None
        assert time.monotonic() - t0 < 0.5


def test_unplug_wakes_a_waiting_reader(fake: FakePortAudio) -> None:
    with mic.MicSource(mic.resolve_device(None), sample_rate=16000, block_frames=320) as source:
        assert len(read_n(source, 2)) == 2
        threading.Timer(0.2, fake.unplug).start()
        t0 = time.monotonic()
        while (block := source.read(timeout=10.0)) is not None:
            assert block.shape == (320, 1)
        assert time.monotonic() - t0 < 1.5
        assert source.lost


def test_hung_stream_counts_as_lost(fake: FakePortAudio, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mic, "STALL_TIMEOUT_S", 0.3)
    with mic.MicSource(mic.resolve_device(None), sample_rate=16000, block_frames=160) as source:
        assert len(read_n(source, 2)) == 2
        fake.freeze()
        t0 = time.monotonic()
        while source.read(timeout=5.0) is not None:
            pass
        assert source.lost and fake.streams[-1].active
        assert time.monotonic() - t0 < 1.5


def test_close_stops_stream_and_read_returns_none(fake: FakePortAudio) -> None:
    source = mic.MicSource(mic.resolve_device(None), sample_rate=16000, block_frames=160)
    source.start()
    assert read_n(source, 1)
    source.close()
    source.close()
    assert not fake.streams[-1].open and fake.initialized == 0
    assert source.read(timeout=1.0) is None
    assert list(source) == []
    assert not source.lost
    with pytest.raises(RuntimeError):
        source.start()
