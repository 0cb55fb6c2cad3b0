"""The device-side commands behind the CLI: transcribe, run, demo."""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np

from edgestream.runtime.bundle import Bundle
from edgestream.runtime.errors import AudioInputError, BundleError
from edgestream.runtime.events.types import Final, Ready
from edgestream.runtime.loop import Driver, LoopConfig, run_loop
from edgestream.runtime.families.moonshine.engine import StreamingEncDecEngine
from edgestream.runtime.families.moonshine.policy import StreamingConfig, StreamingEncDecStreamer
from edgestream.runtime.audio.resample import StreamingResampler
from edgestream.runtime.session import SessionConfig, resolve_providers
from edgestream.runtime.events.sinks import CaptionSink, JsonlSink
from edgestream.runtime.state import StateStore
from edgestream.runtime.audio.sources import AudioSource, FileSource, PcmStdinSource
from edgestream.runtime.families.whisper.transcribe import transcribe_audio
from edgestream.runtime.vad import EndpointConfig, Endpointer, EnergyVad, SileroVad
from edgestream.runtime.audio.wav import read_wav, to_mono
from edgestream.runtime.families.whisper.engine import WhisperEngine
from edgestream.runtime.families.whisper.policy import WhisperStreamConfig, WhisperStreamer

DEMO_CLIP = "beckett.wav"
MIC_QUEUE_S = 10


def _open(args: argparse.Namespace) -> Bundle:
    return Bundle.open(args.bundle, SessionConfig(args.provider, args.threads))


def transcribe(args: argparse.Namespace) -> int:
    # every file is read and checked before the first transcript is printed
    audio = [read_wav(Path(f)) for f in args.files]
    bundle = _open(args)
    rate = bundle.manifest.audio.sample_rate
    whisper = WhisperEngine(bundle) if bundle.manifest.pipeline == "whisper_window" else None
    for f, wav in zip(args.files, audio):
        samples = to_mono(wav.samples)
        if wav.sample_rate != rate:
            resampler = StreamingResampler(wav.sample_rate, rate)
            samples = np.concatenate([resampler.process(samples), resampler.flush()])
        text = (transcribe_audio(whisper, samples) if whisper
                else _transcribe_streaming(bundle, samples))
        print(f"{f}\t{text}", flush=True)
    return 0


def _transcribe_streaming(bundle: Bundle, samples: np.ndarray) -> str:
    """A streaming bundle transcribes a file by streaming it: its lines, finals only."""
    options = argparse.Namespace(vad="auto", endpoint_ms=640, energy_threshold_db=-40.0,
                                 partial_ms=10**9, step_ms=500, realtime=False, input="")
    driver = _driver(bundle, options)
    chunk = bundle.manifest.audio.chunk_samples
    events = [e for i in range(0, samples.size, chunk) for e in driver.feed(samples[i:i + chunk])]
    events += driver.finish()
    return " ".join(e.text for e in events if isinstance(e, Final))


def _endpointer(bundle: Bundle, states: StateStore, args: argparse.Namespace) -> Endpointer:
    rate = bundle.manifest.audio.sample_rate
    vad_kind = args.vad
    if vad_kind == "auto":
        vad_kind = "silero" if bundle.manifest.vad else "energy"
    if vad_kind == "silero":
        if not bundle.manifest.vad:
            raise BundleError(f"{bundle.root}: this bundle ships no VAD graph; use --vad energy "
                              "or re-export with --vad silero")
        vad: EnergyVad | SileroVad = SileroVad(bundle.sessions[bundle.manifest.vad], states, rate)
    else:
        vad = EnergyVad(args.energy_threshold_db)
    return Endpointer(vad, EndpointConfig(endpoint_ms=args.endpoint_ms), rate)


def _driver(bundle: Bundle, args: argparse.Namespace) -> Driver:
    """The pipeline driver the manifest asks for."""
    endpoint = EndpointConfig(endpoint_ms=args.endpoint_ms)
    if bundle.manifest.pipeline == "streaming_encoder_decoder":
        engine = StreamingEncDecEngine(bundle)
        config = StreamingConfig(partial_ms=args.partial_ms, endpoint=endpoint)
        return StreamingEncDecStreamer(engine, _endpointer(bundle, engine.states, args), config)
    if bundle.manifest.pipeline != "whisper_window":
        raise BundleError(f"{bundle.root}: pipeline {bundle.manifest.pipeline!r} has no driver "
                          "in this runtime yet; upgrade edgestream")
    whisper = WhisperEngine(bundle)
    live = getattr(args, "input", "") in ("mic", "-") or args.realtime
    config = WhisperStreamConfig(step_ms=args.step_ms, endpoint=endpoint, adaptive_step=live)
    return WhisperStreamer(whisper, _endpointer(bundle, whisper.states, args), whisper.tokenizer,
                           config)


def _source(args: argparse.Namespace, rate: int) -> tuple[AudioSource, str]:
    if args.input == "-":
        if not 1000 <= args.stdin_rate <= 384000 or not 1 <= args.stdin_channels <= 64:
            raise AudioInputError(f"stdin: --stdin-rate {args.stdin_rate} / --stdin-channels "
                                  f"{args.stdin_channels} is not a usable PCM format; give the "
                                  "rate in Hz (e.g. 16000) and the channel count (e.g. 1)")
        return PcmStdinSource(args.stdin_rate, args.stdin_channels), "stdin (s16le)"
    if args.input == "mic":
        from edgestream.runtime.audio.mic import MicSource, resolve_device

        device = resolve_device(args.device)
        # at least 10 s of queue (sized for 48 kHz, 1024-frame blocks; more at lower rates): a
        # slow decode delays captions but never drops audio
        mic = MicSource(device, sample_rate=rate, queue_blocks=MIC_QUEUE_S * 48000 // 1024)
        mic.start()
        return mic, f"mic: {device.name} @ {mic.sample_rate} Hz"
    return FileSource(Path(args.input), realtime=args.realtime), args.input


def stream(bundle: Bundle, source: AudioSource, label: str, args: argparse.Namespace) -> int:
    driver = _driver(bundle, args)
    m = bundle.manifest
    sink = JsonlSink() if args.jsonl else CaptionSink()
    provider = bundle.sessions[m.graphs[0].name].session.get_providers()[0]
    sink.emit(Ready(str(bundle.root), m.family, m.pipeline, provider, m.audio.sample_rate, label))
    try:
        run_loop(source, driver, [sink], LoopConfig(m.audio.sample_rate, m.audio.chunk_samples,
                                                    args.stats_every))
    finally:
        source.close()
    # a lost microphone is a failure the service manager should see (and restart on)
    return 3 if getattr(source, "lost", False) else 0


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
    bundle = _open(args)
    source, label = _source(args, bundle.manifest.audio.sample_rate)
    return stream(bundle, source, label, args)


def demo(args: argparse.Namespace) -> int:
    bundle_dir = args.cache / "whisper-tiny.en"
    if not (bundle_dir / "manifest.json").is_file():
        print(f"edgestream demo: exporting builtin:whisper-tiny.en to {bundle_dir} (once)...",
              file=sys.stderr, flush=True)
        from edgestream.export.build import ExportOptions, export_bundle

        report = export_bundle(ExportOptions("builtin:whisper-tiny.en", bundle_dir, force=True))
        print(f"edgestream demo: parity ok (max logit diff {report['max_logit_diff']:.2e}, "
              f"{report['identical_clips']}/{len(report['clips'])} clips identical)",
              file=sys.stderr, flush=True)
    bundle = Bundle.open(bundle_dir, SessionConfig(args.provider, args.threads))
    clip = Path(str(files("edgestream.runtime") / "assets" / DEMO_CLIP))
    args.realtime = not args.fast
    source = FileSource(clip, realtime=args.realtime)
    pace = "real-time pace" if args.realtime else "as fast as it computes"
    return stream(bundle, source, f"{DEMO_CLIP} (demo clip, {pace})", args)
