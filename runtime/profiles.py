"""Device profiles (devices/profiles/*.toml): what a kind of device runs best, and how to tell
which device this is.

A profile names the onnxruntime providers to try in order with their options, the preferred
precision per graph (what to export for it), threads, the memory budget for resident bundles,
how many streams get captured CUDA graphs, audio defaults and stream options. Detection reads
the Jetson model from the device tree, the NVIDIA GPU name from the driver, and the CPU
architecture; `profile = "NAME"` or a TOML path overrides it.
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgestream.runtime.errors import EdgestreamError

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack's Python 3.10
    import tomli as tomllib

PROVIDER_NAMES = ("tensorrt", "cuda", "cpu")
PRECISIONS = ("fp32", "fp16", "int8", "int4", "int8-qdq")
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")


class ProfileError(EdgestreamError):
    """A device profile is unknown, unreadable or has a wrong key or value."""


@dataclass(frozen=True)
class Match:
    jetson_model: tuple[str, ...] = ()
    gpu: tuple[str, ...] = ()
    arch: tuple[str, ...] = ()


@dataclass(frozen=True)
class Memory:
    budget_mb: int = 2000
    cuda_graph_streams: int = 0
    # per conversation: recurrent-state copies a hybrid LM keeps for rollback (a real DeltaNet
    # snapshot is ~60 MB; fewer kept costs re-read time after a rollback, never other tokens)
    snapshot_mb: int = 256


@dataclass(frozen=True)
class Audio:
    block_ms: int = 64
    backlog_s: float = 4.0
    rate: int = 16000


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    providers: tuple[str, ...]
    threads: int = 0
    provider_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    precision: dict[str, str] = field(default_factory=dict)  # graph role -> precision
    memory: Memory = Memory()
    audio: Audio = Audio()
    stream: dict[str, Any] = field(default_factory=dict)
    match: Match = Match()
    path: str = ""


@dataclass(frozen=True)
class DeviceFacts:
    """What detection saw; `doctor` prints it."""

    arch: str
    jetson_model: str = ""
    gpus: tuple[str, ...] = ()


def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ProfileError(f"{where}: [{key}] must be a table")
    return value


def _fields(cls: type, data: dict[str, Any], where: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            raise ProfileError(f"{where}: unknown key {key!r}; known: {', '.join(sorted(names))}")
        default = names[key].default
        if isinstance(default, tuple):
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ProfileError(f"{where}: {key} must be a list of strings")
        elif isinstance(default, bool) or not isinstance(value, (int, float)) or \
                isinstance(value, bool) or (isinstance(default, int) and isinstance(value, float)):
            raise ProfileError(f"{where}: {key} must be a {type(default).__name__}, got {value!r}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def parse(data: dict[str, Any], name: str, where: str) -> Profile:
    known = {"description", "match", "session", "providers", "precision", "memory", "audio",
             "stream"}
    for key in data:
        if key not in known:
            raise ProfileError(f"{where}: unknown key {key!r}; known: {', '.join(sorted(known))}")
    session = _table(data, "session", where)
    providers = session.get("providers", ["cpu"])
    if not (isinstance(providers, list) and providers and
            all(p in PROVIDER_NAMES for p in providers)):
        raise ProfileError(f"{where}: session.providers must list some of "
                           f"{', '.join(PROVIDER_NAMES)} in order, got {providers!r}")
    threads = session.get("threads", 0)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ProfileError(f"{where}: session.threads must be a whole number >= 0")
    options = _table(data, "providers", where)
    for provider in options:
        if provider not in PROVIDER_NAMES:
            raise ProfileError(f"{where}: [providers.{provider}]: unknown provider")
    precision = _table(data, "precision", where)
    for role, value in precision.items():
        if value not in PRECISIONS:
            raise ProfileError(f"{where}: precision.{role} = {value!r}; use one of "
                               f"{', '.join(PRECISIONS)}")
    memory = _fields(Memory, _table(data, "memory", where), f"{where}: [memory]")
    if memory.snapshot_mb < 0:
        raise ProfileError(f"{where}: memory.snapshot_mb must be >= 0 (0 keeps no recurrent "
                           "snapshots: a rollback re-reads the conversation)")
    return Profile(
        name=name, description=str(data.get("description", "")),
        providers=tuple(providers), threads=threads,
        provider_options={k: dict(v) for k, v in options.items()}, precision=dict(precision),
        memory=memory,
        audio=_fields(Audio, _table(data, "audio", where), f"{where}: [audio]"),
        stream=dict(_table(data, "stream", where)),
        match=_fields(Match, _table(data, "match", where), f"{where}: [match]"), path=where)


def _builtin_dir() -> Any:
    return resources.files("edgestream.devices") / "profiles"


def names() -> list[str]:
    return sorted(p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".toml"))


def load_profile(spec: str) -> Profile:
    """A builtin profile by name, or a TOML file by path."""
    path = Path(spec)
    if spec.endswith(".toml") or path.is_file():
        source, name = path, path.stem
    else:
        source, name = _builtin_dir() / f"{spec}.toml", spec
        if spec not in names():
            raise ProfileError(f"device profile {spec!r} is unknown; builtin profiles are "
                               f"{', '.join(names())}, or give a TOML file")
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except OSError as e:
        raise ProfileError(f"{source}: cannot read the profile ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{source}: not valid TOML ({e})") from None
    return parse(data, name, str(source))


def device_facts() -> DeviceFacts:
    jetson = ""
    try:
        jetson = DEVICE_TREE_MODEL.read_bytes().rstrip(b"\0").decode(errors="replace")
    except OSError:
        pass
    gpus: tuple[str, ...] = ()
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            gpus = tuple(line.strip() for line in out.stdout.splitlines() if line.strip())
        except (OSError, subprocess.TimeoutExpired):
            pass
    return DeviceFacts(platform.machine(), jetson, gpus)


def detect(facts: DeviceFacts | None = None) -> Profile:
    """The builtin profile for this device: a Jetson by its model, then a GPU by its name (and
    architecture), then the CPU architecture; cpu-x86_64 when nothing matches."""
    facts = facts or device_facts()
    profiles = [load_profile(n) for n in names()]
    if facts.jetson_model:
        for p in profiles:
            if any(m.lower() in facts.jetson_model.lower() for m in p.match.jetson_model):
                return p
    for p in profiles:
        if p.match.gpu and facts.gpus and any(m.lower() in g.lower() for m in p.match.gpu
                                              for g in facts.gpus) and \
                (not p.match.arch or facts.arch in p.match.arch):
            return p
    for p in profiles:
        if not p.match.gpu and not p.match.jetson_model and facts.arch in p.match.arch:
            return p
    return load_profile("cpu-x86_64")


def resolve(spec: str) -> Profile:
    """`auto` (or empty): detect; otherwise a name or a TOML path."""
    return detect() if spec in ("", "auto") else load_profile(spec)
