"""The device-side commands: `transcribe` and `run`, built on the library API."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from edgestream.runtime.api import Model, load
from edgestream.runtime.audio.sources import (DEFAULT_BACKLOG_S, AudioSource, FileSource,
                                              PcmStdinSource)
from edgestream.runtime.audio.wav import read_wav
from edgestream.runtime.errors import AudioInputError, BundleError, OptionError
from edgestream.runtime.events.sinks import CaptionSink, JsonlSink, SinkSet
from edgestream.runtime.loop import LoopConfig, LoopStatus, StopFlag, run_loop
from edgestream.runtime.session import resolve_providers
from edgestream.runtime.doctor import register as register_doctor
from edgestream.runtime.warmup import register as register_warmup
from edgestream.runtime.service.command import register as register_service
from edgestream.runtime.service.config import DEFAULT_ADDRESS, ServerConfig, check_address
from edgestream.runtime.service.main import Kiosk
from edgestream.runtime.signals import handle_signals
from edgestream.runtime.subtitles import FORMATS, render

# CLI flag -> stream option; only flags the user gave are passed, so the model can say which
# options do not fit its family
STREAM_FLAGS = ("endpoint_ms", "vad", "energy_threshold_db", "step_ms", "context_s",
                "partial_ms", "speculate_ms", "language", "task")
# the flags `transcribe` passes to the model as options (Whisper: language and task)
TRANSCRIBE_FLAGS = ("language", "task")


def add_session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda", "tensorrt"],
                   help="onnxruntime execution provider (default: CUDA if available, else CPU)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's)")
    p.add_argument("--profile", help="device profile: a name in devices/profiles (e.g. "
                   "jetson-orin-nano), a TOML path, or auto (detect); sets provider order and "
                   "options, threads and captured streams (--provider/--threads win)")
    p.add_argument("--execution", default="auto", choices=["auto", "host", "bound"],
                   help="host: numpy feeds; bound: state resident on the device (IO binding); "
                        "auto: bound on a GPU provider, host on the CPU")


def add_language_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--language", help="Whisper, multilingual bundles: the spoken language code "
                                      "(e.g. de); not given: detected per window")
    p.add_argument("--task", choices=["transcribe", "translate"],
                   help="Whisper, multilingual bundles: transcribe (default) or translate to "
                        "English")


def add_stream_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jsonl", action="store_true", help="events as JSON lines on stdout")
    p.add_argument("--endpoint-ms", type=int, help="trailing silence that ends a line (640)")
    p.add_argument("--vad", choices=["auto", "silero", "energy"],
                   help="speech gate: the bundle's Silero VAD if present (auto), or energy")
    p.add_argument("--energy-threshold-db", type=float, help="energy gate level (-40 dBFS)")
    p.add_argument("--step-ms", type=int, help="Whisper: re-decode cadence (500)")
    p.add_argument("--context-s", type=float,
                   help="audio and finals kept before a line as context (Whisper 10, "
                   "Moonshine 6; 0: each line alone)")
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
    add_language_args(p)
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
    p.add_argument("--serve", nargs="?", const=DEFAULT_ADDRESS, metavar="HOST:PORT",
                   help=f"also serve the kiosk page, events, /healthz and /metrics (default "
                        f"{DEFAULT_ADDRESS}); with file input the page stays up until stopped")
    p.add_argument("--allow-remote", action="store_true",
                   help="let --serve bind an address other machines can reach")
    p.add_argument("--reconnect", action="store_true",
                   help="mic: when the device is lost, reopen it with backoff instead of "
                        "exiting with code 3 (what the service does)")
    p.add_argument("--respond", type=Path, metavar="LM_BUNDLE",
                   help="answer each turn with this language-model bundle (the responder)")
    p.add_argument("--system-prompt", help="the responder's system prompt (pinned in its window)")
    p.add_argument("--max-reply-tokens", type=int, default=64,
                   help="the responder's longest reply in tokens (64)")
    p.add_argument("--pause-ms", type=int, default=200,
                   help="the responder starts its reply speculatively after this pause (200)")
    add_stream_args(p)
    add_language_args(p)
    add_session_args(p)
    p.set_defaults(handler=run)
    register_service(sub)
    register_doctor(sub)
    register_warmup(sub)


def transcribe(args: argparse.Namespace) -> int:
    if args.format != "txt" and len(args.files) > 1 and args.output_dir is None:
        raise OptionError(f"--format {args.format} with {len(args.files)} files: give "
                          "--output-dir DIR to write one file per input")
    audio = [read_wav(Path(f)) for f in args.files]  # every file is checked before any output
    model = load(args.bundle, args.provider, args.threads, args.profile, args.execution)
    options = {k: getattr(args, k) for k in TRANSCRIBE_FLAGS if getattr(args, k, None) is not None}
    model.stream(**options)  # language and task checked before any output
    for f, wav in zip(args.files, audio):
        result = model.transcribe_segments(wav.samples, wav.sample_rate, **options)
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
    if args.input == "mic" and args.reconnect:
        from edgestream.runtime.audio.field_mic import ReopeningMic

        mic = ReopeningMic(args.device, rate, backlog_s=args.backlog_s)
        return mic, f"mic: {args.device or 'default'} (reopened when lost)", True
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
          args: argparse.Namespace, kiosk: Kiosk | None = None) -> int:
    """Stream `source` through a new stream of `model` to stdout (and the kiosk page) until it
    ends or is stopped."""
    stream = _stream(model, args, live)
    status = kiosk.status if kiosk is not None else LoopStatus()
    sinks = SinkSet([JsonlSink() if args.jsonl else CaptionSink()] +
                    ([kiosk.hub] if kiosk is not None else []))
    sinks.emit([model.ready_event(label)])
    stop = StopFlag()
    restore = handle_signals(stop, source)
    if kiosk is not None:
        kiosk.start(sinks)
        print(f"[kiosk] {kiosk.url}", file=sys.stderr, flush=True)
    try:
        code = run_loop(source, stream, sinks, LoopConfig(args.stats_every, live), stop, status)
        while kiosk is not None and not stop and code == 0 and not sinks.closed:
            time.sleep(0.2)  # the input ended: the page stays up until Ctrl-C or SIGTERM
    finally:
        restore()
        sinks.close()
        if kiosk is not None:
            kiosk.stop()
    if sinks.closed:  # the reader went away: end quietly, with nothing more written to it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno()) if _has_fileno(sys.stdout) else None
        return 0
    # a lost microphone is a failure the service manager should see (and restart on)
    return 3 if getattr(source, "lost", False) and not stop else code


def _stream(model: Model, args: argparse.Namespace, live: bool) -> Any:
    """The model's stream, with the responder beside it when --respond names an LM bundle."""
    lm = getattr(args, "lm", None)
    if lm is None:
        return model.stream(**stream_options(args, live))
    from edgestream.runtime.responder.responder import Responder

    return Responder(model, lm, responder_options(args), **stream_options(args, live))


def responder_options(args: argparse.Namespace) -> Any:
    """`run --respond`'s ResponderOptions; a device profile (--profile) sets the snapshot
    budget (memory.snapshot_mb)."""
    from edgestream.runtime.responder.conversation import DEFAULT_SYSTEM
    from edgestream.runtime.responder.responder import ResponderOptions

    snapshot_bytes = None
    if getattr(args, "profile", None):
        from edgestream.runtime.profiles import resolve

        snapshot_bytes = resolve(args.profile).memory.snapshot_mb << 20
    return ResponderOptions(system_prompt=args.system_prompt or DEFAULT_SYSTEM,
                            max_reply_tokens=args.max_reply_tokens, pause_ms=args.pause_ms,
                            speculative=not args.no_speculative, snapshot_bytes=snapshot_bytes)


def _has_fileno(f: Any) -> bool:
    try:
        f.fileno()
        return True
    except (OSError, ValueError, AttributeError):
        return False


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
    kiosk = None
    if args.serve is not None:  # bound before the model loads: a port in use fails at once
        check_address(args.serve, args.allow_remote, "--serve")
        server = ServerConfig()
        kiosk = Kiosk.bind(args.serve, server.history, server.max_clients, LoopStatus(),
                           "--serve")
    try:
        model = load(args.bundle, args.provider, args.threads, args.profile, args.execution)
        args.lm = None
        if args.respond is not None:
            from edgestream.runtime.responder.lm import load_lm

            # one intra-op thread: the LM runs on the responder's low-priority thread
            args.lm = load_lm(args.respond, args.provider, 1)
        _stream(model, args, False).finish()  # options checked before a device is opened
        source, label, live = _source(args, model.sample_rate)
    except BaseException:
        if kiosk is not None:
            kiosk.server.server_close()
        raise
    return serve(model, source, label, live, args, kiosk)
