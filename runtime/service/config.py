"""The service's TOML config: every key known, typed and checked before anything starts.

A kiosk's config is edited by hand over SSH; a typo must stop the service at start with the key's
name, not be ignored for weeks. Command-line flags override single keys.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgestream.runtime.errors import EdgestreamError

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack's Python 3.10
    import tomli as tomllib

DEFAULT_ADDRESS = "127.0.0.1:8765"


class ConfigError(EdgestreamError):
    """The service config (or an override) is unreadable, has an unknown key or a wrong value."""


@dataclass(frozen=True)
class ServerConfig:
    """The kiosk page, event stream, /healthz and /metrics. `address` "" turns the server off."""

    address: str = DEFAULT_ADDRESS
    allow_remote: bool = False  # any address other than loopback needs this, on purpose
    history: int = 200  # finals kept in memory for pages that reconnect
    max_clients: int = 16
    # Nothing served changes state (write methods get 405); a future control endpoint must
    # come with a token setting and check it.


@dataclass(frozen=True)
class SinkConfig:
    """Where transcripts go besides the page. Both off by default: what people say is private."""

    jsonl: str = ""  # a file path, or "-" for stdout (the journal, under systemd)
    log_text: bool = False  # put caption text into log lines


@dataclass(frozen=True)
class ServiceConfig:
    bundle: str = ""
    profile: str = "auto"  # device profile: auto (detected), a name in devices/profiles, a path
    provider: str = "auto"  # auto: the profile's first provider this onnxruntime has
    threads: int = 0
    input: str = "mic"  # mic, or a WAV path streamed in real time (demos, soak tests)
    input_speed: float = 1.0  # a WAV input's clock: 1 real time, 4 four times faster
    device: str = ""  # capture device: name substring or index; "" the default device
    block_ms: int = 64  # capture block: what the device hands over per callback
    backlog_s: float = 4.0
    stats_every_s: float = 60.0  # a stats line in the log this often (seconds of audio)
    stream: dict[str, Any] = field(default_factory=dict)  # stream options (checked by the model)
    server: ServerConfig = ServerConfig()
    sinks: SinkConfig = SinkConfig()


_SECTIONS = {"server": ServerConfig, "sinks": SinkConfig}


def _typed(where: str, value: Any, kind: Any) -> Any:
    expected = {int: "a whole number", float: "a number", bool: "true or false",
                str: "a string", dict: "a table"}[kind]
    ok = (isinstance(value, kind) and not (kind is int and isinstance(value, bool))) or \
        (kind is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}: expected {expected}, got {value!r} "
                          f"({type(value).__name__})")
    return float(value) if kind is float else value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{where}{key}"
        if key not in fields:
            raise ConfigError(f"{name}: unknown key; known keys{' in [' + where[:-1] + ']' if where else ''}"
                              f" are {', '.join(sorted(fields))}")
        if key in _SECTIONS:
            values[key] = _build(_SECTIONS[key], _typed(name, value, dict), f"{key}.")
            continue
        kind = {"int": int, "float": float, "bool": bool, "str": str}.get(
            str(fields[key].type), dict)
        values[key] = _typed(name, value, kind)
    return cls(**values)


def parse(data: dict[str, Any], source: str = "config") -> ServiceConfig:
    try:
        config = _build(ServiceConfig, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    check(config, source)
    return config


def load(path: Path) -> ServiceConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror}); give --config FILE "
                          "(the installer writes /etc/edgestream/config.toml)") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return parse(data, str(path))


def override(config: ServiceConfig, **changes: Any) -> ServiceConfig:
    """Command-line overrides: `None` leaves the key as configured; dotted keys for sections."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        if value is None:
            continue
        if "." in key:
            section, name = key.split(".", 1)
            sections.setdefault(section, {})[name] = value
        else:
            top[key] = value
    for section, values in sections.items():
        top[section] = dataclasses.replace(getattr(config, section), **values)
    new = dataclasses.replace(config, **top)
    check(new, "command line")
    return new


def split_address(address: str, where: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: {address!r} is not HOST:PORT (for example {DEFAULT_ADDRESS})")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check(config: ServiceConfig, where: str) -> None:
    if not config.bundle:
        raise ConfigError(f"{where}: bundle: no bundle folder given; set bundle = \"/var/lib/"
                          "edgestream/bundles/NAME\" or pass --bundle")
    if not Path(config.bundle).is_dir():
        raise ConfigError(f"{where}: bundle: {config.bundle} is not a folder; export one with "
                          "`edgestream export SOURCE -o DIR` and copy it there")
    if config.provider not in ("auto", "cpu", "cuda", "tensorrt"):
        raise ConfigError(f"{where}: provider: {config.provider!r}; use auto, cpu, cuda or "
                          "tensorrt")
    from edgestream.runtime.profiles import ProfileError, resolve

    try:
        resolve(config.profile)
    except ProfileError as e:
        raise ConfigError(f"{where}: profile: {e}") from None
    if config.input != "mic" and not Path(config.input).is_file():
        raise ConfigError(f"{where}: input: {config.input} is not a file; use \"mic\" or a WAV path")
    for name, value, low in (("threads", config.threads, 0), ("block_ms", config.block_ms, 8),
                             ("server.history", config.server.history, 1),
                             ("server.max_clients", config.server.max_clients, 1)):
        if value < low:
            raise ConfigError(f"{where}: {name}: {value} is below {low}")
    if config.backlog_s <= 0:
        raise ConfigError(f"{where}: backlog_s: give a positive number of seconds")
    if not 0.1 <= config.input_speed <= 100:
        raise ConfigError(f"{where}: input_speed: {config.input_speed} is outside 0.1-100")
    if config.server.address:
        check_address(config.server.address, config.server.allow_remote,
                      f"{where}: server.address")


def check_address(address: str, allow_remote: bool, where: str) -> None:
    host, _ = split_address(address, where)
    if not is_loopback(host) and not allow_remote:
        raise ConfigError(
            f"{where}: {address} is reachable from other machines; the kiosk page needs no "
            "network. Bind 127.0.0.1, or set server.allow_remote = true (--allow-remote) if a "
            "remote screen must read it")
