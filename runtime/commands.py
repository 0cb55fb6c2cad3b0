"""The device-side commands: `transcribe` and `run`, built on the library API."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from edgestream.runtime.api import Model, load
from edgestream.runtime.audio.sources import (DEFAULT_BACKLOG_S, AudioSource, FileSource,
                                              PcmStdinSource)
from edgestream.runtime.audio.wav import read_wav
from edgestream.runtime.errors import AudioInputError, BundleError, OptionError
from edgestream.runtime.events.sinks import CaptionSink, JsonlSink, SinkSet
from edgestream.runtime.events.types import Ready
from edgestream.runtime.loop import LoopConfig, StopFlag, run_loop
from edgestream.runtime.session import resolve_providers
from edgestream.runtime.subtitles import FORMATS, render

# CLI flag -> stream option; only flags the user gave are passed, so the model can say which
# options do not fit its family
STREAM_FLAGS = ("endpoint_ms", "vad", "energy_threshold_db", "step_ms", "context_s",
                "partial_ms", "speculate_ms")


def add_session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda", "tensorrt"],
                   help="onnxruntime execution provider (default: CUDA if available, else CPU)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's)")


def add_stream_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jsonl", action="store_true", help="events as JSON lines on stdout")
    p.add_argument("--endpoint-ms", type=int, help="trailing silence that ends a line (640)")
    p.add_argument("--vad", choices=["auto", "silero", "energy"],
                   help="speech gate: the bundle's Silero VAD if present (auto), or energy")
    p.add_argument("--energy-threshold-db", type=float, help="energy gate level (-40 dBFS)")
    p.add_argument("--step-ms", type=int, help="Whisper: re-decode cadence (500)")
    p.add_argument("--context-s", type=float,
                   help="Whisper: audio and finals kept before a line as context (10)")
    p.add_argument("--partial-ms", type=int,
                   help="streaming encoders: re-decode cadence of the line (200)")
    p.add_argument("--speculate-ms", type=int,
                   help="silence after which the final is decoded ahead of the endpoint (160)")
    p.add_argument("--no-speculative", action="store_true",
                   help="decode finals only once the endpoint is confirmed")
    p.add_argument("--backlog-s", type=float, default=DEFAULT_BACKLOG_S,
                   help="live input: unread audio kept before the oldest is dropped (4)")
    p.add_argument("--stats-every", type=float, default=0.0, metavar="S",
                   help="also emit a stats event every S seconds of audio")


def stream_options(args: argparse.Namespace, live: bool) -> dict[str, Any]:
    options = {k: getattr(args, k) for k in STREAM_FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "no_speculative", False):
        options["speculative"] = False
    return {**options, "live": live}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transcribe", help="transcribe whole files (text or subtitles)")
    p.add_argument("bundle", type=Path)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--format", default="txt", choices=FORMATS,
                   help="txt: one 'FILE<TAB>text' line per file; srt, vtt, json: subtitles")
    p.add_argument("--output-dir", type=Path,
                   help="write FILE.<format> per input here (needed for several files with "
                        "srt, vtt or json)")
    add_session_args(p)
    p.set_defaults(handler=transcribe)

    p = sub.add_parser("run", help="stream captions from a microphone, a file or stdin")
    p.add_argument("bundle", type=Path, nargs="?")
    p.add_argument("--input", default="mic", help="mic, a WAV path, or - for raw s16le on stdin")
    p.add_argument("--device", help="capture device name (substring) or index")
    p.add_argument("--list-devices", action="store_true", help="list capture devices and exit")
    p.add_argument("--realtime", action="store_true", help="pace a file like a microphone")
    p.add_argument("--stdin-rate", type=int, default=16000)
    p.add_argument("--stdin-channels", type=int, default=1)
    add_stream_args(p)
    add_session_args(p)
    p.set_defaults(handler=run)


def transcribe(args: argparse.Namespace) -> int:
    if args.format != "txt" and len(args.files) > 1 and args.output_dir is None:
        raise OptionError(f"--format {args.format} with {len(args.files)} files: give "
                          "--output-dir DIR to write one file per input")
    audio = [read_wav(Path(f)) for f in args.files]  # every file is checked before any output
    model = load(args.bundle, args.provider, args.threads)
    for f, wav in zip(args.files, audio):
        result = model.transcribe_segments(wav.samples, wav.sample_rate)
        text = f"{f}\t{result.text}\n" if args.format == "txt" else render(result, args.format,
                                                                           str(f))
        if args.output_dir is not None:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            (args.output_dir / f"{Path(f).stem}.{args.format}").write_text(
                render(result, args.format, str(f)))
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
    return 0


def _source(args: argparse.Namespace, rate: int) -> tuple[AudioSource, str, bool]:
    if args.input == "-":
        if not 1000 <= args.stdin_rate <= 384000 or not 1 <= args.stdin_channels <= 64:
            raise AudioInputError(f"stdin: --stdin-rate {args.stdin_rate} / --stdin-channels "
                                  f"{args.stdin_channels} is not a usable PCM format; give the "
                                  "rate in Hz (e.g. 16000) and the channel count (e.g. 1)")
        return PcmStdinSource(args.stdin_rate, args.stdin_channels), "stdin (s16le)", True
    if args.input == "mic":
        from edgestream.runtime.audio.mic import MicSource, resolve_device

        device = resolve_device(args.device)
        mic = MicSource(device, sample_rate=rate,
                        queue_blocks=max(1, int(args.backlog_s * max(rate, 48000) / 1024)))
        mic.start()
        return mic, f"mic: {device.name} @ {mic.sample_rate} Hz", True
    source = FileSource(Path(args.input), realtime=args.realtime, backlog_s=args.backlog_s)
    return source, args.input, args.realtime


def serve(model: Model, source: AudioSource, label: str, live: bool,
          args: argparse.Namespace) -> int:
    """Stream `source` through a new stream of `model` to stdout until it ends or is stopped."""
    stream = model.stream(**stream_options(args, live))
    sinks = SinkSet([JsonlSink() if args.jsonl else CaptionSink()])
    m = model.bundle.manifest
    sinks.emit([Ready(str(model.bundle.root), m.family, m.pipeline, model.provider,
                      model.sample_rate, label)])
    stop = StopFlag()
    restore = _handle_signals(stop, source)
    try:
        code = run_loop(source, stream, sinks, LoopConfig(args.stats_every, live), stop)
    finally:
        restore()
        sinks.close()
    if sinks.closed:  # the reader went away: end quietly, with nothing more written to it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno()) if _has_fileno(sys.stdout) else None
        return 0
    # a lost microphone is a failure the service manager should see (and restart on)
    return 3 if getattr(source, "lost", False) and not stop else code


def _has_fileno(f: Any) -> bool:
    try:
        f.fileno()
        return True
    except (OSError, ValueError, AttributeError):
        return False


def _handle_signals(stop: StopFlag, source: AudioSource) -> Callable[[], None]:
    """SIGTERM and the first Ctrl-C stop capture (the line is finalized, exit 0); a second
    Ctrl-C exits at once. Python runs signal handlers only between bytecodes of the main thread,
    so a long onnxruntime call would delay them: the signals are also written to a wakeup pipe
    that a watcher thread reads the moment they arrive. Only the main thread can install
    handlers; elsewhere nothing changes."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def watch() -> None:
        interrupts = 0
        while data := os.read(read_fd, 64):
            for signum in data:
                if signum == signal.SIGINT:
                    interrupts += 1
                    if interrupts > 1:
                        os._exit(130)
                stop.set("shutdown")
                source.request_stop()

    def on_signal(signum: int, frame: Any) -> None:  # the watcher does the work
        stop.set("shutdown")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="edgestream-signals", daemon=True)
    watcher.start()

    def restore() -> None:
        signal.set_wakeup_fd(previous_fd)
        for s, h in previous.items():
            signal.signal(s, h)
        os.close(write_fd)  # the watcher reads end-of-file and ends
        watcher.join(1.0)
        os.close(read_fd)

    return restore


def run(args: argparse.Namespace) -> int:
    if args.list_devices:
        from edgestream.runtime.audio.mic import list_input_devices

        for d in list_input_devices():
            print(d.describe())
        return 0
    if args.bundle is None:
        raise BundleError("run needs a BUNDLE folder (or --list-devices)")
    resolve_providers(args.provider)
    if args.input not in ("mic", "-") and not Path(args.input).is_file():
        raise AudioInputError(f"{args.input}: no such file (use --input mic, a WAV file, or -)")
    if args.backlog_s <= 0:
        raise OptionError(f"--backlog-s {args.backlog_s}: give a positive number of seconds")
    model = load(args.bundle, args.provider, args.threads)
    model.stream(**stream_options(args, False))  # options checked before a device is opened
    source, label, live = _source(args, model.sample_rate)
    return serve(model, source, label, live, args)
