"""`edgestream service --config FILE`: what the systemd unit runs. Flags override config keys."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from edgestream.runtime.service import config as service_config


def process_age_s() -> float:
    """Seconds since this process started (so READY's figure includes interpreter start-up)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("service", help="run as the device service (systemd, kiosk page)")
    p.add_argument("--config", type=Path, help="TOML config (see devices/config.toml)")
    p.add_argument("--bundle", help="override: bundle folder")
    p.add_argument("--input", help="override: mic, or a WAV file streamed in real time")
    p.add_argument("--device", help="override: capture device name (substring) or index")
    p.add_argument("--serve", metavar="HOST:PORT", help="override: server address ('' off)")
    p.add_argument("--allow-remote", action="store_true", default=None,
                   help="override: allow a server address other machines can reach")
    p.add_argument("--profile", help="override: device profile (auto, a name, a TOML path)")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda", "tensorrt"])
    p.add_argument("--threads", type=int)
    p.add_argument("--jsonl", metavar="PATH", help="override: also write events to PATH ('-': "
                   "stdout). Transcripts are private: off unless asked for")
    p.set_defaults(handler=service)


def service(args: argparse.Namespace) -> int:
    from edgestream.runtime.service.main import configure_logging, run_service

    started = time.monotonic() - process_age_s()
    configure_logging()
    overrides = {"bundle": args.bundle, "input": args.input, "device": args.device,
                 "server.address": args.serve, "server.allow_remote": args.allow_remote,
                 "provider": args.provider, "profile": args.profile, "threads": args.threads, "sinks.jsonl": args.jsonl}
    if args.config is not None:
        config = service_config.load(args.config)
        config = service_config.override(config, **overrides)
    else:
        data: dict = {}
        for key, value in overrides.items():
            if value is None:
                continue
            section, _, name = key.rpartition(".")
            (data.setdefault(section, {}) if section else data)[name] = value
        config = service_config.parse(data, "command line")
    return run_service(config, started,
                       origin=str(args.config) if args.config else "command line")
