"""A fake of the PortAudio boundary: a stand-in for the C extension ``pyaudio._portaudio``.

Only the C module is faked. The real ``pyaudio.PyAudio`` and ``PyAudio.Stream`` classes stay in
use: every method of theirs calls through the module global ``pyaudio.pa``, so installing this
object there (``monkeypatch.setattr(pyaudio, "pa", fake)``) puts the whole Python layer of
PyAudio on top of a simulated device list. Constants (``paInt16``, ``paContinue``, error codes…)
are those of the real C module; ``pyaudio`` copied them into its own namespace at import anyway.

The shapes mirror the C module (src/pyaudio/*.c of PyAudio 0.2.14):

- ``get_device_info`` returns a struct whose ``name`` is *bytes* (PyAudio decodes it);
  ``get_host_api_info`` returns a struct whose ``name`` is str.
- ``is_format_supported`` returns True or raises ``ValueError(text, code)``.
- ``open``/``start_stream``/… raise ``OSError(code, text)`` (note the reversed order).
- ``get_default_input_device`` raises ``OSError("No Default Input Device Available")``.
- ``open`` parses ``rate`` as a C int, so a float rate is a TypeError.
- A callback stream calls ``callback(in_bytes, frame_count, time_info, status_flags)`` from its
  own thread; the callback returns ``(out_bytes_or_None, flag)``; a flag other than paContinue,
  or an exception, ends the stream (it becomes inactive).

For callback streams a thread calls the callback every ``frames_per_buffer / rate`` seconds of
wall time (deadline scheduled, so the cadence does not drift) with interleaved int16 bytes of a
sine per channel (see :meth:`FakePortAudio.signal`), and records how long each call took.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyaudio._portaudio as _real

PA_NO_DEVICE: int = _real.paNoDevice


@dataclass(frozen=True)
class FakeDevice:
    """One simulated PortAudio device."""

    name: str
    max_input_channels: int
    default_sample_rate: float
    max_output_channels: int = 0
    host_api: int = 0
    supported_rates: tuple[int, ...] | None = None  # None: every rate
    open_error: tuple[int, str] | None = None  # (PaError code, text) raised by open()


@dataclass(frozen=True)
class _DeviceInfo:
    structVersion: int
    name: bytes
    hostApi: int
    maxInputChannels: int
    maxOutputChannels: int
    defaultLowInputLatency: float
    defaultLowOutputLatency: float
    defaultHighInputLatency: float
    defaultHighOutputLatency: float
    defaultSampleRate: float


@dataclass(frozen=True)
class _HostApiInfo:
    structVersion: int
    type: int
    name: str
    deviceCount: int
    defaultInputDevice: int
    defaultOutputDevice: int


@dataclass(eq=False)
class FakeStream:
    """What ``pa.open`` returns; tests inspect ``callback_durations`` and ``calls``."""

    owner: FakePortAudio
    device_index: int
    rate: int
    channels: int
    format: int
    frames_per_buffer: int
    callback: Callable[..., Any] | None
    inputLatency: float = 0.01
    outputLatency: float = 0.0
    structVersion: int = 1
    callback_durations: list[float] = field(default_factory=list)
    callback_errors: list[BaseException] = field(default_factory=list)
    calls: int = 0
    open: bool = True
    active: bool = False
    stopped: bool = True
    _stop: threading.Event = field(default_factory=threading.Event)
    _frozen: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def sampleRate(self) -> float:
        return float(self.rate)

    # Lifecycle, driven by the FakePortAudio functions below.

    def start(self) -> None:
        if self.callback is None or self.active:
            self.active, self.stopped = True, False
            return
        self._stop.clear()
        self.active, self.stopped = True, False
        self._thread = threading.Thread(target=self._run, name="fake-portaudio-callback", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        self._thread = None
        self.active, self.stopped = False, True

    def unplug(self) -> None:
        """The device vanished: callbacks stop and the stream turns inactive (not stopped)."""
        self._stop.set()
        self.active = False

    def freeze(self) -> None:
        """The host API hangs: callbacks stop but the stream still reports itself active."""
        self._frozen.set()

    def _run(self) -> None:
        period = self.frames_per_buffer / self.rate
        start = time.perf_counter()
        block = 0
        while True:
            deadline = start + (block + 1) * period
            delay = deadline - time.perf_counter()
            if self._stop.wait(timeout=max(0.0, delay)):
                return
            if self._frozen.is_set():
                self._stop.wait(timeout=0.01)
                continue
            if self.owner.unplug_after_blocks is not None and block >= self.owner.unplug_after_blocks:
                self.unplug()
                return
            frames = self.owner.signal(block * self.frames_per_buffer, self.frames_per_buffer,
                                       self.channels, self.rate)
            data = frames.astype("<i2").tobytes()
            flags = self.owner.status_for_block(block) if self.owner.status_for_block else 0
            now = time.perf_counter() - start
            time_info = {"input_buffer_adc_time": now - period, "current_time": now,
                         "output_buffer_dac_time": 0.0}
            t0 = time.perf_counter()
            try:
                result = self.callback(data, self.frames_per_buffer, time_info, flags)  # type: ignore[misc]
            except Exception as exc:  # the C module prints it, re-raises it elsewhere, aborts
                self.callback_errors.append(exc)
                self.active = False
                return
            finally:
                self.callback_durations.append(time.perf_counter() - t0)
                self.calls += 1
            block += 1
            if not (isinstance(result, tuple) and len(result) == 2) or result[1] != _real.paContinue:
                self.active = False
                return


class FakePortAudio:
    """Stand-in for ``pyaudio._portaudio`` with a fixed device list.

    ``default_input`` is the index PortAudio reports as default input (None: no default).
    ``status_for_block(i)`` gives the status flags passed with block ``i``.
    ``unplug_after_blocks``: every callback stream stops (device gone) after that many blocks.
    """

    def __init__(
        self,
        devices: list[FakeDevice],
        default_input: int | None = None,
        host_apis: tuple[str, ...] = ("ALSA",),
        *,
        frequency_hz: float = 440.0,
        amplitude: int = 12000,
        status_for_block: Callable[[int], int] | None = None,
        unplug_after_blocks: int | None = None,
    ) -> None:
        self.devices = list(devices)
        self.default_input = default_input
        self.host_apis = host_apis
        self.frequency_hz = frequency_hz
        self.amplitude = amplitude
        self.status_for_block = status_for_block
        self.unplug_after_blocks = unplug_after_blocks
        self.streams: list[FakeStream] = []
        self.initialized = 0
        self.format_checks: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        # Constants only: a function the fake lacks must fail loudly, never reach real PortAudio.
        if name.startswith("pa"):
            return getattr(_real, name)
        raise AttributeError(f"FakePortAudio does not implement pyaudio._portaudio.{name}")

    # Test helpers.

    def signal(self, start_frame: int, frames: int, channels: int, rate: int) -> np.ndarray:
        """int16 [frames, channels]: channel c is a sine at ``frequency_hz * (c + 1)``."""
        t = (start_frame + np.arange(frames))[:, None] / rate
        freqs = self.frequency_hz * (np.arange(channels)[None, :] + 1)
        return np.round(self.amplitude * np.sin(2 * np.pi * freqs * t)).astype(np.int16)

    def unplug(self) -> None:
        """Unplug now: every active stream stops delivering and turns inactive."""
        for stream in self.streams:
            stream.unplug()

    def freeze(self) -> None:
        for stream in self.streams:
            stream.freeze()

    def _device(self, index: int) -> FakeDevice:
        if not 0 <= index < len(self.devices):
            raise OSError(_real.paInvalidDevice, "Invalid device info")
        return self.devices[index]

    # Initialization and misc.

    def initialize(self) -> None:
        self.initialized += 1

    def terminate(self) -> None:
        self.initialized -= 1

    def get_version(self) -> int:
        return 1246976

    def get_version_text(self) -> str:
        return "PortAudio V19.7.0-devel (fake)"

    def get_sample_size(self, format: int) -> int:
        return _real.get_sample_size(format)  # pure arithmetic in the C library

    # Host APIs.

    def get_host_api_count(self) -> int:
        return len(self.host_apis)

    def get_default_host_api(self) -> int:
        return 0

    def get_host_api_info(self, index: int) -> _HostApiInfo:
        if not 0 <= index < len(self.host_apis):
            raise OSError(_real.paInvalidHostApi, "Invalid host api info")
        count = sum(1 for d in self.devices if d.host_api == index)
        default = self.default_input if self.default_input is not None else PA_NO_DEVICE
        return _HostApiInfo(1, index, self.host_apis[index], count, default, PA_NO_DEVICE)

    # Devices.

    def get_device_count(self) -> int:
        return len(self.devices)

    def get_default_input_device(self) -> int:
        if self.default_input is None:
            raise OSError("No Default Input Device Available")
        return self.default_input

    def get_default_output_device(self) -> int:
        raise OSError("No Default Output Device Available")

    def get_device_info(self, index: int) -> _DeviceInfo:
        d = self._device(index)
        return _DeviceInfo(2, d.name.encode("utf-8"), d.host_api, d.max_input_channels,
                           d.max_output_channels, 0.0087, 0.0087, 0.035, 0.035,
                           d.default_sample_rate)

    def is_format_supported(self, sample_rate: float, input_device: int = -1,
                            input_channels: int = -1, input_format: int = -1,
                            output_device: int = -1, output_channels: int = -1,
                            output_format: int = -1) -> bool:
        self.format_checks.append({"rate": sample_rate, "device": input_device,
                                   "channels": input_channels, "format": input_format})
        error = self._check(input_device, int(sample_rate), input_channels)
        if error is not None:
            raise ValueError(error[1], error[0])
        return True

    def _check(self, index: int, rate: int, channels: int) -> tuple[int, str] | None:
        if not 0 <= index < len(self.devices):
            return _real.paInvalidDevice, "Invalid device"
        d = self.devices[index]
        if not 1 <= channels <= d.max_input_channels:
            return _real.paInvalidChannelCount, "Invalid number of channels"
        if d.supported_rates is not None and rate not in d.supported_rates:
            return _real.paInvalidSampleRate, "Invalid sample rate"
        return None

    # Streams.

    def open(self, rate: int, channels: int, format: int, input: bool = False,
             output: bool = False, input_device_index: int | None = None,
             output_device_index: int | None = None,
             frames_per_buffer: int = _real.paFramesPerBufferUnspecified,
             input_host_api_specific_stream_info: Any = None,
             output_host_api_specific_stream_info: Any = None,
             stream_callback: Callable[..., Any] | None = None) -> FakeStream:
        if not isinstance(rate, int):
            raise TypeError("'float' object cannot be interpreted as an integer")
        if stream_callback is not None and not callable(stream_callback):
            raise TypeError("stream_callback must be callable")
        if not (input or output):
            raise ValueError("Must specify either input or output")
        if output:
            raise OSError(_real.paInvalidDevice, "Invalid output device (no default output device)")
        index = self.default_input if input_device_index is None else int(input_device_index)
        if index is None:
            raise OSError(_real.paInvalidDevice, "Invalid input device (no default output device)")
        device = self._device(index)
        if device.open_error is not None:
            raise OSError(*device.open_error)
        error = self._check(index, rate, channels)
        if error is not None:
            raise OSError(*error)
        if format != _real.paInt16:
            raise OSError(_real.paSampleFormatNotSupported, "Sample format not supported")
        frames = frames_per_buffer if frames_per_buffer > 0 else 1024
        stream = FakeStream(self, index, rate, channels, format, frames, stream_callback)
        self.streams.append(stream)
        return stream

    def _open_stream(self, stream: FakeStream) -> FakeStream:
        if not stream.open:
            raise OSError(_real.paBadStreamPtr, "Stream closed")
        return stream

    def close(self, stream: FakeStream) -> None:
        stream.stop()
        stream.open = False

    def start_stream(self, stream: FakeStream) -> None:
        self._open_stream(stream).start()

    def stop_stream(self, stream: FakeStream) -> None:
        self._open_stream(stream).stop()

    def abort_stream(self, stream: FakeStream) -> None:
        self._open_stream(stream).stop()

    def is_stream_active(self, stream: FakeStream) -> bool:
        return self._open_stream(stream).active

    def is_stream_stopped(self, stream: FakeStream) -> bool:
        return self._open_stream(stream).stopped

    def get_stream_time(self, stream: FakeStream) -> float:
        self._open_stream(stream)
        return time.monotonic()

    def get_stream_cpu_load(self, stream: FakeStream) -> float:
        self._open_stream(stream)
        return 0.0


def usb_and_default() -> FakePortAudio:
    """Typical kiosk: an output-only HDMI sink, a USB mic (48 kHz stereo), a default device."""
    return FakePortAudio(
        [
            FakeDevice("HDA NVidia: HDMI 0 (hw:0,3)", 0, 44100.0, max_output_channels=8),
            FakeDevice("USB PnP Sound Device: Audio (hw:1,0)", 2, 48000.0,
                       supported_rates=(44100, 48000)),
            FakeDevice("default", 32, 44100.0, max_output_channels=32),
        ],
        default_input=2,
    )
