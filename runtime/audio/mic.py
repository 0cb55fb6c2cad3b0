"""Microphone capture through PyAudio (PortAudio): device lookup and a real-time audio source.

The PortAudio callback only hands raw int16 bytes to a bounded queue and counts; it never blocks
and never computes. Conversion to float32 happens in :meth:`MicSource.read`, on the consumer's
thread. pyaudio is imported lazily so that machines without it can still run file input.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any

import numpy as np

from edgestream.runtime.errors import AudioDeviceError

logger = logging.getLogger(__name__)

LIST_HINT = "run `edgestream run BUNDLE --list-devices` to see the capture devices"
# A stream that reports itself active but delivers nothing for this long is treated as lost
# (some ALSA drivers hang instead of erroring when a USB device is pulled).
STALL_TIMEOUT_S = 2.0
_POLL_S = 0.05  # how often a waiting read() checks whether the device is gone


@dataclass(frozen=True)
class InputDevice:
    """A PortAudio device that can capture (``max_input_channels > 0``)."""

    index: int
    name: str
    max_input_channels: int
    default_sample_rate: float
    host_api: str
    is_default: bool

    def describe(self) -> str:
        """One line for listings: ``[2] USB mic (hw:1,0)  2 ch, 48000 Hz, ALSA (default)``."""
        default = " (default)" if self.is_default else ""
        return (f"[{self.index}] {self.name}  {self.max_input_channels} ch, "
                f"{self.default_sample_rate:g} Hz, {self.host_api}{default}")


def _import_pyaudio() -> ModuleType:
    try:
        import pyaudio
    except ImportError as exc:
        raise AudioDeviceError(
            "Microphone input needs PyAudio, which is not installed: run "
            "`pip install 'edgestream[mic]'` (on Debian/Ubuntu/JetPack run "
            "`sudo apt install portaudio19-dev` first so it can build). File input works without it."
        ) from exc
    return pyaudio


def _open_portaudio(pyaudio: ModuleType) -> Any:
    try:
        return pyaudio.PyAudio()
    except OSError as exc:
        raise AudioDeviceError(f"PortAudio could not start ({exc}); check that the sound "
                               "system works (`arecord -l`) and that this user is in the `audio` group") from exc


def list_input_devices() -> list[InputDevice]:
    """Every PortAudio device with at least one input channel, in PortAudio index order."""
    pyaudio = _import_pyaudio()
    pa = _open_portaudio(pyaudio)
    try:
        try:
            default_index: int | None = int(pa.get_default_input_device_info()["index"])
        except OSError:  # PyAudio raises this when PortAudio has no default input device
            default_index = None
        devices = []
        for index in range(pa.get_device_count()):
            info = pa.get_device_info_by_index(index)
            if int(info["maxInputChannels"]) <= 0:
                continue
            name = info["name"]
            if isinstance(name, bytes):  # PyAudio hands back bytes when no codec decoded it
                name = name.decode("utf-8", errors="replace")
            host_api = str(pa.get_host_api_info_by_index(info["hostApi"])["name"])
            devices.append(InputDevice(index, name, int(info["maxInputChannels"]),
                                       float(info["defaultSampleRate"]), host_api,
                                       index == default_index))
        return devices
    finally:
        pa.terminate()


def _listing(devices: list[InputDevice]) -> str:
    return "\n".join("  " + d.describe() for d in devices)


def resolve_device(spec: str | None) -> InputDevice:
    """Find the capture device for ``spec``.

    None or ``"default"``: PortAudio's default input; digits: that device index; anything else: a
    case-insensitive part of the device name (an exact name wins over partial matches).
    """
    devices = list_input_devices()
    if not devices:
        raise AudioDeviceError(
            "No audio capture device was found: PortAudio lists no device with input channels. "
            "Plug in a microphone, check it shows up in `arecord -l`, and that this user is in "
            "the `audio` group.")
    wanted = (spec or "default").strip()
    if wanted.lower() == "default":
        for device in devices:
            if device.is_default:
                return device
        raise AudioDeviceError(
            "No default capture device is set; pass a device name or index, one of:\n"
            f"{_listing(devices)}\n({LIST_HINT})")
    if wanted.isdigit():
        matches = [d for d in devices if d.index == int(wanted)]
    else:
        exact = [d for d in devices if d.name.lower() == wanted.lower()]
        matches = exact or [d for d in devices if wanted.lower() in d.name.lower()]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise AudioDeviceError(
            f"Capture device {spec!r} is ambiguous; it matches:\n{_listing(matches)}\n"
            "Pass the index or a longer part of the name.")
    raise AudioDeviceError(
        f"Capture device {spec!r} not found. Available input devices:\n{_listing(devices)}\n"
        f"({LIST_HINT})")


class MicSource:
    """Real-time blocks from a capture device as float32 ``[frames, channels]`` arrays.

    ``sample_rate`` is the requested rate when the device supports it, else the device's default
    rate (the runtime resamples). The queue is the live backlog: once ``queue_blocks`` are
    waiting, the *oldest* block is dropped for the newest (fresh audio matters more than stale
    audio), counted in ``dropped_blocks``, and the hole is reported by :meth:`take_gap`.
    """

    def __init__(self, device: InputDevice, sample_rate: int | None = None, channels: int = 1,
                 block_frames: int = 1024, queue_blocks: int = 64) -> None:
        if not 1 <= channels <= device.max_input_channels:
            raise AudioDeviceError(
                f"Capture device {device.describe()} has {device.max_input_channels} input "
                f"channel(s); {channels} were asked for. Use channels=1..{device.max_input_channels}.")
        if block_frames < 1 or queue_blocks < 1:
            raise ValueError(f"block_frames ({block_frames}) and queue_blocks ({queue_blocks}) must be >= 1")
        self.device = device
        self.channels = channels
        self.block_frames = block_frames
        self._pyaudio = _import_pyaudio()
        self._continue: int = self._pyaudio.paContinue
        self._overflow_flag: int = self._pyaudio.paInputOverflow
        # (index of the block's first frame, raw bytes)
        self._queue: queue.Queue[tuple[int, bytes]] = queue.Queue(maxsize=queue_blocks)
        self._captured_frames = 0  # frames the device delivered (callback thread only)
        self._next_frame = 0  # frame the consumer expects next
        self._gap_frames = 0
        self._stop = False
        self._stream: Any = None
        self._closed = False
        self._lost = False
        self._blocks = 0
        self._dropped_blocks = 0
        self._input_overflows = 0
        self._seen_blocks = 0
        self._seen_at = 0.0
        self._pa: Any = _open_portaudio(self._pyaudio)
        try:
            self.sample_rate: int = self._choose_rate(sample_rate)
        except AudioDeviceError:
            self._pa.terminate()
            raise

    def _supported(self, rate: int) -> str | None:
        """None when PortAudio accepts ``rate`` for this device and channel count, else its reason."""
        try:
            self._pa.is_format_supported(rate, input_device=self.device.index,
                                         input_channels=self.channels,
                                         input_format=self._pyaudio.paInt16)
        except ValueError as exc:  # PyAudio raises ValueError(text, code) instead of returning False
            return str(exc.args[0]) if exc.args else str(exc)
        return None

    def _choose_rate(self, requested: int | None) -> int:
        default = int(round(self.device.default_sample_rate))
        if requested is not None and requested != default:
            reason = self._supported(requested)
            if reason is None:
                return requested
            logger.info("Capture device %s does not take %d Hz (%s); capturing at its default "
                        "%d Hz and resampling", self.device.describe(), requested, reason, default)
        reason = self._supported(default)
        if reason is not None:
            raise AudioDeviceError(
                f"Capture device {self.device.describe()} refuses {default} Hz, {self.channels} "
                f"ch, int16 ({reason}). Try another channel count or device ({LIST_HINT}).")
        return default

    def _callback(self, in_data: bytes | None, frame_count: int, time_info: dict[str, float],
                  status_flags: int) -> tuple[None, int]:
        # Runs on PortAudio's thread: copy, count, return. Nothing here may block or compute.
        if status_flags & self._overflow_flag:
            self._input_overflows += 1
        self._blocks += 1
        item = (self._captured_frames, in_data or b"")
        self._captured_frames += frame_count
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            try:  # drop the oldest block; the consumer sees the hole in the frame indices
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._dropped_blocks += 1
            try:
                self._queue.put_nowait(item)
            except queue.Full:  # the consumer raced us; this block is lost instead
                pass
        return None, self._continue

    def start(self) -> None:
        """Open and start the capture stream (no-op when already started)."""
        if self._closed:
            raise RuntimeError(f"MicSource for {self.device.describe()} is closed; make a new one")
        if self._stream is not None:
            return
        try:
            self._stream = self._pa.open(
                rate=self.sample_rate, channels=self.channels, format=self._pyaudio.paInt16,
                input=True, input_device_index=self.device.index,
                frames_per_buffer=self.block_frames, stream_callback=self._callback)
        except OSError as exc:
            raise AudioDeviceError(
                f"Could not open capture device {self.device.describe()} at {self.sample_rate} Hz, "
                f"{self.channels} ch, int16: {exc}. Check that no other program holds it "
                f"(`fuser -v /dev/snd/*`), or pick another device ({LIST_HINT}).") from exc
        self._seen_at = time.monotonic()
        logger.info("Capturing from %s at %d Hz, %d ch, %d-frame blocks", self.device.describe(),
                    self.sample_rate, self.channels, self.block_frames)

    @property
    def lost(self) -> bool:
        """True once the stream stopped delivering (device unplugged or host API hung)."""
        if self._lost or self._stream is None or self._closed:
            return self._lost
        now = time.monotonic()
        if self._blocks != self._seen_blocks:
            self._seen_blocks, self._seen_at = self._blocks, now
        stall_s = max(STALL_TIMEOUT_S, 4 * self.block_frames / self.sample_rate)
        try:
            active = bool(self._stream.is_active())
        except OSError:  # PyAudio raises when PortAudio reports an error for the stream
            active = False
        if not active or now - self._seen_at > stall_s:
            self._lost = True
            logger.warning("Capture device %s stopped delivering audio (%s) after %d blocks",
                           self.device.describe(), "stream inactive" if not active else
                           f"no block for {now - self._seen_at:.1f} s", self._blocks)
        return self._lost

    def read(self, timeout: float) -> np.ndarray | None:
        """The next block as float32 ``[frames, channels]`` in [-1, 1), or None.

        None means no block within ``timeout`` seconds, the source is closed, or the device is
        lost (queued blocks are still returned first). It never waits longer than ``timeout``.
        """
        if self._closed:
            return None
        if self._stream is None:
            raise RuntimeError("MicSource.read() called before start()")
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                first, raw = self._queue.get(timeout=max(0.0, min(_POLL_S, remaining)))
            except queue.Empty:
                if self._closed or self._stop or self.lost or remaining <= 0:
                    return None
                continue
            self._gap_frames += max(0, first - self._next_frame)
            self._next_frame = first + len(raw) // (2 * self.channels)
            samples = np.frombuffer(raw, dtype="<i2").reshape(-1, self.channels)
            return samples.astype(np.float32) * np.float32(1.0 / 32768.0)

    def __iter__(self) -> Iterator[np.ndarray]:
        """Blocks until the source is closed or stopped, or the device is lost."""
        while not self._closed and not self._stop:
            block = self.read(timeout=0.5)
            if block is not None:
                yield block
            elif self._closed or self._stop or self.lost:
                return

    def take_gap(self) -> int:
        """Frames dropped from the backlog just before the block last read (0: contiguous)."""
        gap, self._gap_frames = self._gap_frames, 0
        return gap

    def request_stop(self) -> None:
        """End the iteration within one poll; safe from a signal handler (no PortAudio call)."""
        self._stop = True

    def counters(self) -> dict[str, int]:
        """``blocks`` delivered by the device, ``dropped_blocks`` of those that found the queue
        full, ``input_overflows`` reported by PortAudio (paInputOverflow)."""
        return {"blocks": self._blocks, "dropped_blocks": self._dropped_blocks,
                "input_overflows": self._input_overflows}

    def close(self) -> None:
        """Stop and release the device; safe to call twice. read() returns None afterwards."""
        if self._closed:
            return
        self._closed = True
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.stop_stream()
            except OSError as exc:  # an unplugged device can fail to stop; closing still works
                logger.warning("Stopping capture device %s: %s", self.device.describe(), exc)
            try:
                stream.close()
            except OSError as exc:
                logger.warning("Closing capture device %s: %s", self.device.describe(), exc)
        self._pa.terminate()
        logger.info("Closed %s: %s", self.device.describe(), self.counters())

    def __enter__(self) -> MicSource:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
