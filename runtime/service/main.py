"""The service: config checked, server bound, bundle loaded and warmed up, then READY; the
loop runs until SIGTERM, survives a lost microphone, and feeds the kiosk page.

Order matters for systemd: everything that can be wrong with the config (unknown key, missing
bundle, port in use, a remote address without the flag, a bad stream option) fails before
READY=1, so `systemctl start` reports it instead of a service that looks up but is not.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TextIO

from edgestream.runtime import profiles
from edgestream.runtime.api import Model, load
from edgestream.runtime.audio.sources import AudioSource, FileSource
from edgestream.runtime.audio.wav import read_wav
from edgestream.runtime.events.sinks import JsonlSink, Sink, SinkSet
from edgestream.runtime.events.types import (ErrorEvent, Event, Final, Gap, Notice,
                                              Stats)
from edgestream.runtime.loop import LoopConfig, LoopStatus, StopFlag, run_loop
from edgestream.runtime.service import metrics
from edgestream.runtime.errors import OptionError
from edgestream.runtime.service.config import ConfigError, ServiceConfig, split_address
from edgestream.runtime.service.hub import EventHub
from edgestream.runtime.service.notify import Notifier
from edgestream.runtime.service.server import KioskServer, bind
from edgestream.runtime.signals import handle_signals

log = logging.getLogger("edgestream")

WARM_UP_S = 3.0  # of the packaged clip: every graph runs once before READY


class LogSink:
    """Notable events as single journal lines. Caption text only when the config asks for it:
    what people say near a kiosk is theirs."""

    def __init__(self, text: bool) -> None:
        self.text = text

    def emit(self, event: Event) -> None:
        if isinstance(event, Notice):
            log.warning("%s: %s", event.kind, event.message)
        elif isinstance(event, ErrorEvent):
            log.error("%s", event.message)
        elif isinstance(event, Gap):
            log.warning("gap: %.2f s of audio lost at %.1f s", event.duration, event.t)
        elif isinstance(event, Stats):
            v = event.values
            log.info("stats: %.0f s audio, RTF %.3f, step p50/p99 %s/%s ms, end of speech -> "
                     "final p50 %s ms, gaps %s, overruns %s", v["audio_s"], v["rtf"],
                     v["step_ms_p50"], v["step_ms_p99"], v.get("eos_to_final_ms_p50", "-"),
                     v.get("gaps", 0), v.get("mic_overruns", 0))
        elif isinstance(event, Final) and self.text and event.text:
            log.info("line %d: %s", event.line, event.text)


@dataclass
class Kiosk:
    """The page, event stream, /healthz and /metrics beside a loop."""

    hub: EventHub
    server: KioskServer
    status: LoopStatus
    ready: bool = False
    sinks: SinkSet | None = None

    @classmethod
    def bind(cls, address: str, history: int, max_clients: int, status: LoopStatus,
             where: str = "server.address") -> "Kiosk":
        host, port = split_address(address, where)
        hub = EventHub(history, max_clients)
        kiosk: Kiosk

        def health() -> dict[str, object]:
            return metrics.health(status, kiosk.ready)

        def render() -> str:
            return metrics.render(status, hub, kiosk.sinks, kiosk.ready)

        kiosk = cls(hub, bind(host, port, hub, health, render), status)
        return kiosk

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self, sinks: SinkSet) -> None:
        self.sinks = sinks
        self.server.start()
        self.ready = True
        log.info("kiosk page at %s", self.url)

    def stop(self) -> None:
        self.ready = False
        self.server.stop()


def warm_up(model: Model) -> float:
    """Run every graph once on real speech, so the first utterance pays no first-run cost."""
    started = time.perf_counter()
    clip = read_wav(Path(str(resources.files("edgestream.runtime") / "assets" / "beckett.wav")))
    stream = model.stream(speculative=False)
    n = int(WARM_UP_S * clip.sample_rate)
    stream.feed(clip.samples[:n], clip.sample_rate)
    stream.finish()
    return time.perf_counter() - started


def _open_jsonl(path: str, origin: str) -> TextIO:
    if path == "-":
        return sys.stdout
    try:
        return open(path, "a", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{origin}: sinks.jsonl: cannot append to {path} ({e.strerror}); under "
                          "systemd only /var/lib/edgestream and /var/log/edgestream are "
                          "writable") from None


def pick_provider(profile: profiles.Profile, configured: str) -> str:
    """`auto`: the profile's first provider that this onnxruntime offers (`edgestream doctor`
    proves it really runs); anything else is the operator's explicit choice."""
    if configured != "auto":
        return configured
    import onnxruntime as ort

    from edgestream.runtime.doctor import ORT_NAME

    available = ort.get_available_providers()
    for provider in profile.providers:
        if ORT_NAME[provider] in available:
            return provider
    return "cpu"


def configure_logging() -> None:
    # journald stamps each line itself; a terminal gets the time
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(levelname)s %(message)s" if journal else
                        "%(asctime)s %(levelname)s %(message)s")


def open_source(config: ServiceConfig, rate: int) -> tuple[AudioSource, str]:
    if config.input == "mic":
        from edgestream.runtime.audio.field_mic import ReopeningMic

        return (ReopeningMic(config.device or None, rate, config.block_ms, config.backlog_s),
                f"mic: {config.device or 'default'}")
    source = FileSource(Path(config.input), realtime=True, backlog_s=config.backlog_s,
                        speed=config.input_speed)
    source.block_frames = max(64, source.sample_rate * config.block_ms // 1000)
    return source, config.input


def run_service(config: ServiceConfig, started: float, notifier: Notifier | None = None,
                keep_serving: bool = True, origin: str = "config") -> int:
    """The whole service life; returns the exit code (0 after SIGTERM). `origin` names the
    config file in errors."""
    notifier = notifier or Notifier()
    status = LoopStatus()
    kiosk = None
    if config.server.address:
        kiosk = Kiosk.bind(config.server.address, config.server.history,
                           config.server.max_clients, status)
    try:
        profile = profiles.resolve(config.profile)
        provider, threads = pick_provider(profile, config.provider), config.threads or \
            profile.threads
        load_from = time.monotonic()
        model = load(config.bundle, provider, threads, profile=profile)  # provider options
        load_s = time.monotonic() - load_from
        # the profile's stream options where this family takes them; the config's win
        accepted = model.stream_option_names()
        options = {k: v for k, v in profile.stream.items() if k in accepted}
        try:
            stream = model.stream(**{**options, **config.stream, "live": True})
        except OptionError as e:
            raise ConfigError(f"{origin}: [stream]: {e}") from None
        sinks_list: list[Sink] = [LogSink(config.sinks.log_text)]
        if kiosk is not None:
            sinks_list.append(kiosk.hub)
        if config.sinks.jsonl:
            sinks_list.append(JsonlSink(_open_jsonl(config.sinks.jsonl, origin)))
        warm_s = warm_up(model)
        source, label = open_source(config, model.sample_rate)
    except BaseException:
        if kiosk is not None:
            kiosk.server.server_close()
        raise
    sinks = SinkSet(sinks_list)
    m = model.bundle.manifest
    sinks.emit([model.ready_event(label)])
    stop = StopFlag()
    restore = handle_signals(stop, source)
    if kiosk is not None:
        kiosk.start(sinks)
    ready_s = time.monotonic() - started
    summary = (f"ready in {ready_s:.2f} s (start-up {load_from - started:.2f} s, load "
               f"{load_s:.2f} s, warm-up {warm_s:.2f} s): {m.family} on {model.provider}, profile "
               f"{profile.name}, input {label}")
    log.info("%s", summary)
    notifier.ready(summary)
    code = 1
    try:
        speed = config.input_speed if config.input != "mic" else 1.0
        code = run_loop(source, stream, sinks, LoopConfig(config.stats_every_s, True, speed),
                        stop, status, heartbeat=notifier.watchdog)
        notifier.status("input ended" if not stop else "stopping")
        while keep_serving and kiosk is not None and not stop and code == 0:
            notifier.watchdog()  # the input ended (a file): the page stays up until stopped
            time.sleep(0.2)
    finally:
        notifier.stopping()
        restore()
        sinks.close()
        if kiosk is not None:
            kiosk.stop()
        notifier.close()
    log.info("stopped (%s)", stop.reason if stop else "input ended")
    return code
