"""The bundle contract: `manifest.json` as frozen dataclasses, parsed and checked field by field.

`export/` writes a manifest, the runtime reads it; nothing else passes between them. Parsing is
strict: an unknown pipeline, a state pair that points at a missing graph input, or a shape that is
not static is refused here, before any session is opened, with the field named.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from edgestream.runtime.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Pipeline kinds the runtime knows how to drive (DESIGN.md section 3).
PIPELINES = ("whisper_window", "streaming_encoder_decoder", "audio_lm", "decoder_lm")
DTYPES = ("float32", "float16", "int64", "int32", "bool", "int8", "uint8")
UpdateKind = Literal["replace", "append"]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: every dimension is static (batch 1), except a named token axis
    (a string) that the graph's `dims` lists the exact sizes of."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class DataFile:
    """An external-data file of a graph (weights beside the .onnx), hashed like the graph."""

    file: str
    sha256: str


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX file of the bundle and its exact signature."""

    name: str
    file: str
    sha256: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # symbolic axis name -> the only sizes the runtime runs it at (e.g. tokens: 1 and K, a
    # decoder's step and block in one graph, so its weights are stored once)
    dims: dict[str, tuple[int, ...]] = field(default_factory=dict)
    external_data: tuple[DataFile, ...] = ()

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)


@dataclass(frozen=True)
class StatePair:
    """A piece of streaming state: a buffer the runtime owns, fed to one graph input and updated
    from one graph output (possibly of another graph, e.g. an encoder filling cross-attention K/V).

    `replace`: the output has the buffer's shape and replaces it. `append`: the output is a slice
    written into the buffer at a position along `axis` (the driver says which position).
    """

    name: str
    graph: str
    input: str
    output_graph: str
    output: str
    shape: tuple[int, ...]
    dtype: str
    init: float = 0.0
    update: UpdateKind = "replace"
    axis: int | None = None
    # further graphs that read this buffer through an input named `input` and update it through
    # an output named `output` (e.g. a K-token decoder block beside the one-token step)
    shared_with: tuple[str, ...] = ()
    # those of `shared_with` that only read it (no output named `output`: e.g. the block reading
    # the cross K/V that the encoder writes). Derived from the graph signatures when the manifest
    # omits it; when given, it must agree with them.
    read_only: tuple[str, ...] = ()

    def reads(self, graph: str) -> bool:
        return graph == self.graph or graph in self.shared_with

    def writes(self, graph: str) -> bool:
        return graph == self.output_graph or (graph in self.shared_with
                                              and graph not in self.read_only)


@dataclass(frozen=True)
class AudioGeometry:
    """How audio enters the model: rate, the samples one step consumes, lookahead, frames/s."""

    sample_rate: int
    chunk_samples: int
    lookahead_samples: int = 0
    frame_rate: float = 0.0
    window_samples: int = 0


@dataclass(frozen=True)
class TokenizerSpec:
    """The tokenizer file and the special tokens the drivers need, by role."""

    file: str
    special: dict[str, int] = field(default_factory=dict)
    sha256: str = ""  # checked when present (bundles since issue 7 always write it)


@dataclass(frozen=True)
class DecodingSpec:
    """Decoder limits and the token rules the original model's generation config implies."""

    max_tokens: int
    prompt: tuple[int, ...] = ()
    suppress: tuple[int, ...] = ()
    suppress_at_begin: tuple[int, ...] = ()
    # multilingual models: language code -> its token id (language is chosen at run time)
    languages: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceInfo:
    """Where the weights came from, so a bundle can be traced back."""

    id: str
    kind: str
    revision: str = ""
    sha256: str = ""


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    family: str
    pipeline: str
    source: SourceInfo
    audio: AudioGeometry
    graphs: tuple[GraphSpec, ...]
    states: tuple[StatePair, ...]
    tokenizer: TokenizerSpec
    decoding: DecodingSpec
    vad: str = ""
    parity: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def graph(self, name: str) -> GraphSpec:
        for g in self.graphs:
            if g.name == name:
                return g
        raise BundleError(f"{MANIFEST_NAME}: no graph named {name!r} (graphs: "
                          f"{', '.join(g.name for g in self.graphs)}); re-export the bundle")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"


def _req(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise BundleError(f"{MANIFEST_NAME}: field {where}.{key} is missing")
    return obj[key]


def _number(obj: dict[str, Any], key: str, where: str, kind: type = int,
            default: Any = None) -> Any:
    value = obj.get(key, default) if default is not None else _req(obj, key, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BundleError(f"{MANIFEST_NAME}: field {where}.{key} must be a number, got {value!r}")
    return kind(value)


def _shape(value: Any, where: str, symbols: dict[str, tuple[int, ...]] | None = None
           ) -> tuple[int, ...]:
    symbols = symbols or {}

    def ok(d: Any) -> bool:
        return (isinstance(d, int) and not isinstance(d, bool) and d > 0) or \
            (isinstance(d, str) and d in symbols)

    if not isinstance(value, list) or not all(ok(d) for d in value):
        named = f" or one of the graph's dims {sorted(symbols)}" if symbols else ""
        raise BundleError(f"{MANIFEST_NAME}: {where} must be a list of positive integers (static "
                          f"shape){named}, got {value!r}")
    return tuple(value)


def _dims(obj: dict[str, Any], where: str) -> dict[str, tuple[int, ...]]:
    dims = obj.get("dims", {})
    if not isinstance(dims, dict):
        raise BundleError(f"{MANIFEST_NAME}: {where}.dims must be an object, got {dims!r}")
    out = {}
    for k, sizes in dims.items():
        if not isinstance(sizes, list) or not sizes or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes):
            raise BundleError(f"{MANIFEST_NAME}: {where}.dims.{k} must be a non-empty list of "
                              f"positive sizes, got {sizes!r}")
        out[k] = tuple(sizes)
    return out


def _data_files(obj: dict[str, Any], where: str) -> tuple[DataFile, ...]:
    files = obj.get("external_data", [])
    if not isinstance(files, list):
        raise BundleError(f"{MANIFEST_NAME}: {where}.external_data must be a list")
    out = []
    for j, f in enumerate(files):
        w = f"{where}.external_data[{j}]"
        if not isinstance(f, dict) or not all(isinstance(f.get(k), str)
                                              for k in ("file", "sha256")):
            raise BundleError(f"{MANIFEST_NAME}: {w} needs string fields file and sha256")
        if "/" in f["file"] or "\\" in f["file"] or f["file"] in ("", ".", ".."):
            raise BundleError(f"{MANIFEST_NAME}: {w}.file {f['file']!r} must be a file name in "
                              "the bundle folder")
        out.append(DataFile(f["file"], f["sha256"]))
    return tuple(out)


def _dtype(value: Any, where: str) -> str:
    if value not in DTYPES:
        raise BundleError(f"{MANIFEST_NAME}: {where} has unknown dtype {value!r} "
                          f"(known: {', '.join(DTYPES)})")
    return value


def _tensor(obj: dict[str, Any], where: str,
            symbols: dict[str, tuple[int, ...]] | None = None) -> TensorSpec:
    name = _req(obj, "name", where)
    return TensorSpec(name, _dtype(_req(obj, "dtype", where), f"{where}.dtype"),
                      _shape(_req(obj, "shape", where), f"{where}.shape", symbols))


def _graph(obj: dict[str, Any], i: int) -> GraphSpec:
    w = f"graphs[{i}]"
    for key in ("name", "file", "sha256"):
        if not isinstance(_req(obj, key, w), str):
            raise BundleError(f"{MANIFEST_NAME}: {w}.{key} must be a string")
    dims = _dims(obj, w)
    return GraphSpec(
        name=_req(obj, "name", w), file=_req(obj, "file", w), sha256=_req(obj, "sha256", w),
        precision=obj.get("precision", "fp32"),
        inputs=tuple(_tensor(t, f"{w}.inputs[{j}]", dims)
                     for j, t in enumerate(_req(obj, "inputs", w))),
        outputs=tuple(_tensor(t, f"{w}.outputs[{j}]", dims)
                      for j, t in enumerate(_req(obj, "outputs", w))),
        dims=dims, external_data=_data_files(obj, w))


def _state(obj: dict[str, Any], i: int, graphs: dict[str, GraphSpec]) -> StatePair:
    w = f"states[{i}]"
    s = StatePair(
        name=_req(obj, "name", w), graph=_req(obj, "graph", w), input=_req(obj, "input", w),
        output_graph=obj.get("output_graph", obj.get("graph")), output=_req(obj, "output", w),
        shape=_shape(_req(obj, "shape", w), f"{w}.shape"),
        dtype=_dtype(_req(obj, "dtype", w), f"{w}.dtype"), init=float(obj.get("init", 0.0)),
        update=obj.get("update", "replace"), axis=obj.get("axis"),
        shared_with=tuple(obj.get("shared_with", ())))
    if s.update not in ("replace", "append"):
        raise BundleError(f"{MANIFEST_NAME}: {w}.update must be 'replace' or 'append', "
                          f"got {s.update!r}")
    for g in s.shared_with:
        if g not in graphs:
            raise BundleError(f"{MANIFEST_NAME}: {w} ({s.name}) refers to unknown graph {g!r}")
    # a shared graph without an output named `output` only reads the buffer
    derived = tuple(g for g in s.shared_with if graphs[g].output(s.output) is None)
    if "read_only" in obj:
        given = tuple(obj["read_only"])
        if sorted(given) != sorted(derived):
            raise BundleError(
                f"{MANIFEST_NAME}: {w}.read_only ({s.name}) is {list(given)} but the shared graphs "
                f"without an output named {s.output!r} are {list(derived)}; re-export the bundle")
        derived = given
    s = replace(s, read_only=derived)
    uses = [(s.graph, s.input, "input"), (s.output_graph, s.output, "output")]
    for g in s.shared_with:
        uses.append((g, s.input, "input"))
        if g not in s.read_only:
            uses.append((g, s.output, "output"))
    for gname, tname, kind in uses:
        g = graphs.get(gname)
        if g is None:
            raise BundleError(f"{MANIFEST_NAME}: {w} ({s.name}) refers to unknown graph {gname!r}")
        spec = g.input(tname) if kind == "input" else g.output(tname)
        if spec is None:
            raise BundleError(f"{MANIFEST_NAME}: {w} ({s.name}): graph {gname!r} has no {kind} "
                              f"named {tname!r}")
        if spec.dtype != s.dtype:
            raise BundleError(f"{MANIFEST_NAME}: {w} ({s.name}): dtype {s.dtype} but graph "
                              f"{gname!r} {kind} {tname!r} is {spec.dtype}")
        if kind == "input" and spec.shape != s.shape:
            raise BundleError(f"{MANIFEST_NAME}: {w} ({s.name}): shape {list(s.shape)} but graph "
                              f"{gname!r} input {tname!r} is {list(spec.shape)}")
        if kind == "output":
            _check_update_shape(s, spec, w)
    return s


def _check_update_shape(s: StatePair, out: TensorSpec, where: str) -> None:
    if s.update == "replace" and out.shape != s.shape:
        raise BundleError(f"{MANIFEST_NAME}: {where} ({s.name}) is 'replace' but output "
                          f"{out.name!r} has shape {list(out.shape)}, state {list(s.shape)}")
    if s.update == "append":
        if s.axis is None or not 0 <= s.axis < len(s.shape) or len(out.shape) != len(s.shape):
            raise BundleError(f"{MANIFEST_NAME}: {where} ({s.name}) is 'append' and needs a valid "
                              f"axis and an output of the same rank; got axis {s.axis!r}, output "
                              f"{list(out.shape)}")
        others = [d for k, d in enumerate(out.shape) if k != s.axis]
        if others != [d for k, d in enumerate(s.shape) if k != s.axis]:
            raise BundleError(f"{MANIFEST_NAME}: {where} ({s.name}) append slice "
                              f"{list(out.shape)} does not fit state {list(s.shape)}")


def parse_manifest(data: dict[str, Any]) -> Manifest:
    """Build a Manifest from decoded JSON, refusing anything inconsistent."""
    try:
        return _parse(data)
    except (TypeError, ValueError, AttributeError) as e:
        # a field of the wrong JSON type (a number where an object belongs, text for a number)
        raise BundleError(f"{MANIFEST_NAME}: a field has the wrong type ({e}); re-export the "
                          "bundle") from e


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = _req(data, key, "manifest")
    if not isinstance(value, dict):
        raise BundleError(f"{MANIFEST_NAME}: field {key} must be an object, got {value!r}")
    return value


def _parse(data: dict[str, Any]) -> Manifest:
    version = _req(data, "schema_version", "manifest")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{MANIFEST_NAME}: schema_version {version!r} is not supported by this "
                          f"runtime (expects {SCHEMA_VERSION}); re-export the bundle or upgrade "
                          "edgestream")
    pipeline = _req(data, "pipeline", "manifest")
    if pipeline not in PIPELINES:
        raise BundleError(f"{MANIFEST_NAME}: pipeline {pipeline!r} is unknown "
                          f"(known: {', '.join(PIPELINES)})")
    graphs = tuple(_graph(g, i) for i, g in enumerate(_req(data, "graphs", "manifest")))
    by_name = {g.name: g for g in graphs}
    if len(by_name) != len(graphs):
        raise BundleError(f"{MANIFEST_NAME}: graph names are not unique")
    states = tuple(_state(s, i, by_name) for i, s in enumerate(data.get("states", [])))
    audio, tok = _section(data, "audio"), _section(data, "tokenizer")
    dec, src = _section(data, "decoding"), _section(data, "source")
    vad = data.get("vad", "")
    if vad and vad not in by_name:
        raise BundleError(f"{MANIFEST_NAME}: field vad names graph {vad!r}, which the bundle "
                          "does not have")
    return Manifest(
        schema_version=version, family=_req(data, "family", "manifest"), pipeline=pipeline,
        source=SourceInfo(id=_req(src, "id", "source"), kind=src.get("kind", ""),
                          revision=src.get("revision", ""), sha256=src.get("sha256", "")),
        audio=AudioGeometry(
            sample_rate=_number(audio, "sample_rate", "audio"),
            chunk_samples=_number(audio, "chunk_samples", "audio"),
            lookahead_samples=_number(audio, "lookahead_samples", "audio", int, 0),
            frame_rate=_number(audio, "frame_rate", "audio", float, 0.0),
            window_samples=_number(audio, "window_samples", "audio", int, 0)),
        graphs=graphs, states=states,
        tokenizer=TokenizerSpec(file=_req(tok, "file", "tokenizer"),
                                special={k: int(v) for k, v in tok.get("special", {}).items()},
                                sha256=str(tok.get("sha256", ""))),
        decoding=DecodingSpec(max_tokens=_number(dec, "max_tokens", "decoding"),
                              prompt=tuple(dec.get("prompt", ())),
                              suppress=tuple(dec.get("suppress", ())),
                              suppress_at_begin=tuple(dec.get("suppress_at_begin", ())),
                              languages={str(k): int(v)
                                         for k, v in dec.get("languages", {}).items()}),
        vad=vad, parity=data.get("parity", {}), extra=data.get("extra", {}))


def load_manifest(path: Path) -> Manifest:
    """Read and parse `manifest.json` from a bundle folder (or the file itself)."""
    file = path / MANIFEST_NAME if path.is_dir() else path
    if not file.exists():
        raise BundleError(f"{file}: no manifest found; is {path} an edgestream bundle? "
                          "Create one with `edgestream export`")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{file}: not valid JSON ({e}); re-export the bundle") from e
    if not isinstance(data, dict):
        raise BundleError(f"{file}: top level must be a JSON object")
    return parse_manifest(data)
