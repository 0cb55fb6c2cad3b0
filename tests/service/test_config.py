"""Bad config is refused at start, before READY, with the key or value named."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from conftest import speech_dir
from service_helpers import NotifySocket, Service, notify_socket  # noqa: F401 (fixture)

from edgestream.runtime.service import config as service_config
from edgestream.runtime.service.config import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def refused(args: list[str], notify: NotifySocket) -> str:
    service = Service(args, {"NOTIFY_SOCKET": str(notify.path)})
    code = service.wait(120)
    assert code == 2, service.log
    assert not notify.times("READY"), notify.messages  # refused before READY
    return service.log


@pytest.mark.parametrize("text, named", [
    ('bundle = "{b}"\nendpoint = 300\n', "endpoint: unknown key"),
    ('bundle = "{b}"\nthreads = "four"\n', "threads: expected a whole number, got 'four'"),
    ('bundle = "{b}"\n[server]\nadress = "127.0.0.1:9"\n', "server.adress: unknown key"),
    ('bundle = "{b}"\n[server]\nhistory = true\n', "server.history: expected a whole number"),
    ('bundle = "/nonexistent/bundle"\n', "bundle: /nonexistent/bundle is not a folder"),
    ('bundle = "{b}"\n[server]\naddress = "0.0.0.0:8765"\n', "0.0.0.0:8765 is reachable from"),
    ('bundle = "{b}"\n[server]\naddress = "localhost"\n', "'localhost' is not HOST:PORT"),
    ('bundle = "{b}"\n[stream]\nendpoint_ms = 10\n', "endpoint_ms=10"),
    ('bundle = "{b}"\nblock_ms = 4\n', "block_ms: 4 is below 8"),
    ('bundle = "{b}\n', "not valid TOML"),
    ('bundle = "{b}"\nprofile = "jetson-orin-nanoo"\n',
     "profile: device profile 'jetson-orin-nanoo' is unknown"),
    ('bundle = "{b}"\nprovider = "gpu"\n', "provider: 'gpu'; use auto, cpu, cuda or tensorrt"),
    ('bundle = "{b}"\n[sinks]\njsonl = "/nonexistent/dir/events.jsonl"\n',
     "sinks.jsonl: cannot append to /nonexistent/dir/events.jsonl"),
])
def test_bad_config_is_refused_before_ready(tiny_bundle: Path, tmp_path: Path,
                                            notify_socket: NotifySocket, text: str,
                                            named: str) -> None:
    path = write(tmp_path, text.replace("{b}", str(tiny_bundle)))
    log = refused(["--config", str(path), "--input", str(speech_dir() / "beckett.wav")],
                  notify_socket)
    assert named in log and str(path) in log, log


def test_port_in_use_is_refused_before_ready(tiny_bundle: Path, tmp_path: Path,
                                             notify_socket: NotifySocket) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        log = refused(["--bundle", str(tiny_bundle), "--input", str(speech_dir() / "beckett.wav"),
                       "--serve", f"127.0.0.1:{port}"], notify_socket)
    finally:
        holder.close()
    assert f"cannot listen on 127.0.0.1:{port}" in log and "pick another port" in log, log


def test_remote_address_needs_the_flag(tiny_bundle: Path) -> None:
    base = {"bundle": str(tiny_bundle), "server": {"address": "192.168.1.20:8765"}}
    with pytest.raises(ConfigError, match="allow_remote"):
        service_config.parse(base)
    ok = service_config.parse({**base, "server": {**base["server"], "allow_remote": True}})
    assert ok.server.address == "192.168.1.20:8765"


def test_overrides_are_checked_too(tiny_bundle: Path) -> None:
    config = service_config.parse({"bundle": str(tiny_bundle)})
    assert service_config.override(config, threads=2, **{"server.address": "[::1]:9000"}
                                   ).server.address == "[::1]:9000"
    with pytest.raises(ConfigError, match="command line: bundle: /missing is not a folder"):
        service_config.override(config, bundle="/missing")


def test_the_shipped_config_template_parses(tiny_bundle: Path) -> None:
    import sys

    tomllib = __import__("tomllib" if sys.version_info >= (3, 11) else "tomli")
    template = Path(__file__).resolve().parents[2] / "devices" / "config.toml"
    data = tomllib.loads(template.read_text())
    config = service_config.parse({**data, "bundle": str(tiny_bundle)})
    assert config.server.address == "127.0.0.1:8765" and not config.sinks.log_text
    assert config.sinks.jsonl == ""  # transcripts are private by default


def test_run_serve_refuses_a_remote_address_and_a_busy_port(tiny_bundle: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    from edgestream.runtime import cli

    clip = str(speech_dir() / "beckett.wav")
    assert cli.main(["run", str(tiny_bundle), "--input", clip, "--serve", "0.0.0.0:8765"]) == 2
    assert "--serve: 0.0.0.0:8765 is reachable from other machines" in capsys.readouterr().err
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        assert cli.main(["run", str(tiny_bundle), "--input", clip, "--serve",
                         f"127.0.0.1:{port}"]) == 2
    finally:
        holder.close()
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
