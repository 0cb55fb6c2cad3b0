"""The Whisper recipe: load from any source, export encoder + decoder step (+ a K-token decoder
block), describe the bundle."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from optimum.utils import NormalizedConfigManager
from tokenizers import Tokenizer
from transformers import WhisperForConditionalGeneration

from edgestream.export.errors import ExportError
from edgestream.export.onnx_export import export_graph, graph_entry
from edgestream.export.sources import ResolvedSource
from edgestream.export.whisper.graphs import WhisperDecoderStep, WhisperEncoderGraph
from edgestream.runtime.bundle import sha256_file

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
HOP = 160
BLOCK_TOKENS = 16  # tokens per decoder_block pass (DESIGN.md section 8)
_SPECIALS = {"sot": "<|startoftranscript|>", "eot": "<|endoftext|>",
             "no_timestamps": "<|notimestamps|>", "timestamp_begin": "<|0.00|>",
             "transcribe": "<|transcribe|>", "translate": "<|translate|>",
             "sot_prev": "<|startofprev|>"}


@dataclass(frozen=True)
class WhisperParts:
    """Everything the recipe needs from a source, whatever its format."""

    model: WhisperForConditionalGeneration
    tokenizer_json: str
    special: dict[str, int]
    prompt: tuple[int, ...]
    suppress: tuple[int, ...]
    suppress_at_begin: tuple[int, ...]
    source: dict[str, str]
    languages: dict[str, int]  # empty for English-only models


def _special_ids(tok: Tokenizer) -> dict[str, int]:
    ids = {role: tok.token_to_id(text) for role, text in _SPECIALS.items()}
    missing = [role for role in ("sot", "eot") if ids[role] is None]
    if missing:
        raise ExportError(f"tokenizer.json lacks Whisper's special tokens {missing}")
    if ids["timestamp_begin"] is None and ids["no_timestamps"] is not None:
        # tokenizer.json files of English-only checkpoints omit the 1501 timestamp tokens; they
        # follow <|notimestamps|> in the model's vocabulary
        ids["timestamp_begin"] = ids["no_timestamps"] + 1
    return {k: v for k, v in ids.items() if v is not None}


def load_whisper(src: ResolvedSource, revision: str | None = None,
                 language: str = "en") -> WhisperParts:
    """Load a Whisper model and its tokenizer from a builtin, CTranslate2, local or hub source."""
    if src.kind in ("builtin", "ct2"):
        from edgestream.export.whisper.ct2 import load_ct2_whisper

        model, info = load_ct2_whisper(src.path)
        tokenizer_json = Path(info.tokenizer_json).read_text()
        source = {"id": src.text, "kind": src.kind,
                  "sha256": sha256_file(src.path / "model.bin")}
    else:
        from transformers import WhisperTokenizerFast

        where = str(src.path) if src.path else src.text
        model = WhisperForConditionalGeneration.from_pretrained(
            where, revision=revision, dtype=torch.float32)
        tokenizer_json = WhisperTokenizerFast.from_pretrained(
            where, revision=revision).backend_tokenizer.to_str()
        source = {"id": src.text, "kind": src.kind,
                  "revision": str(getattr(model.config, "_commit_hash", "") or revision or "")}
    model.eval()
    special = _special_ids(Tokenizer.from_str(tokenizer_json))
    gen = model.generation_config
    prompt = [special["sot"]]
    languages: dict[str, int] = {}
    if getattr(gen, "is_multilingual", False):
        lang_ids = getattr(gen, "lang_to_id", {}) or {}
        languages = {k.strip("<|>"): int(v) for k, v in lang_ids.items()}
        lang = lang_ids.get(f"<|{language}|>")
        if lang is None:
            raise ExportError(f"language {language!r} is not one this model knows")
        prompt += [lang, special["transcribe"]]
    if "no_timestamps" in special:
        prompt.append(special["no_timestamps"])
    return WhisperParts(
        model=model, tokenizer_json=tokenizer_json, special=special, prompt=tuple(prompt),
        suppress=tuple(int(t) for t in (gen.suppress_tokens or [])),
        suppress_at_begin=tuple(int(t) for t in (gen.begin_suppress_tokens or [])),
        source=source, languages=languages)


def export_whisper_graphs(parts: WhisperParts, out: Path,
                          block_tokens: int = BLOCK_TOKENS, fuse: bool = True) -> dict:
    """Write encoder.onnx, decoder.onnx and tokenizer.json into `out`; return the manifest dict
    (without parity, which the caller adds after checking).

    The decoder graph's token axis is symbolic and run at exactly two sizes, 1 (the step) and
    `block_tokens` (K: teacher-forcing or re-scoring K tokens in one pass over the same state
    buffers), so the bundle carries the decoder weights once. 0 declares the step only. A K
    beyond the model's positions is cut to them. `fuse`: rewrite GELU and attention onto
    onnxruntime's fused CPU operators (`fusion`; the CPU target's bundles)."""
    cfg = parts.model.config
    t_max = cfg.max_target_positions
    if block_tokens != 0 and block_tokens < 2:
        raise ExportError(f"block_tokens {block_tokens}: use 0 (step only) or >= 2")
    block = min(block_tokens, t_max)
    # optimum's normalized view reads width/heads/vocab the same way for every Whisper-like config
    norm = NormalizedConfigManager.get_normalized_config_class("whisper")(cfg)
    n_frames = 2 * cfg.max_source_positions
    heads, d = cfg.decoder_attention_heads, norm.hidden_size
    head_dim = d // heads
    mel = torch.zeros(1, cfg.num_mel_bins, n_frames)
    export_graph(WhisperEncoderGraph(parts.model), (mel,), out / "encoder.onnx", ["mel"],
                 [f"cross_{kv}_{i}" for i in range(cfg.decoder_layers) for kv in "kv"])
    self_kv = [torch.zeros(1, heads, t_max, head_dim) for _ in range(2 * cfg.decoder_layers)]
    cross_kv = [torch.zeros(1, heads, cfg.max_source_positions, head_dim)
                for _ in range(2 * cfg.decoder_layers)]
    names = [f"{kv}_{i}" for i in range(cfg.decoder_layers) for kv in "kv"]
    inputs = ["tokens", "position", *[f"self_{n}" for n in names], *[f"cross_{n}" for n in names]]
    step = WhisperDecoderStep(parts.model, parts.suppress, parts.suppress_at_begin,
                              parts.special.get("timestamp_begin", 0),
                              eot=parts.special.get("eot", -1),
                              no_timestamps=parts.special.get("no_timestamps", -1))
    head = ["choice", "choice_logprob"] if step.greedy_head else []  # the greedy head
    outputs = ["logits", *head, *[f"new_self_{n}" for n in names]]
    dynamic = {"tokens": (1, "tokens", t_max)}
    example: tuple[torch.Tensor, ...] = ()
    if step.timestamp_head:  # the timestamp rule's per-row history (graphs.py)
        inputs.insert(2, "timestamp_state")
        dynamic["timestamp_state"] = (1, "tokens", t_max)
        example = (torch.tensor([[[0, -1], [1, -1]]], dtype=torch.long),)
    # traced at 2 tokens: torch.export specializes an example size of 1
    export_graph(step,
                 (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                  *example, *self_kv, *cross_kv),
                 out / "decoder.onnx", inputs, outputs, dynamic=dynamic)
    (out / "tokenizer.json").write_text(parts.tokenizer_json)
    fused = {}
    if fuse:
        from edgestream.export.whisper.fusion import fuse_file

        fused = {g: vars(fuse_file(out / f"{g}.onnx")) for g in ("encoder", "decoder")}
    states = []
    for n in names:
        states.append({"name": f"cross_{n}", "graph": "decoder", "input": f"cross_{n}",
                       "output_graph": "encoder", "output": f"cross_{n}",
                       "shape": [1, heads, cfg.max_source_positions, head_dim],
                       "dtype": "float32", "update": "replace"})
        states.append({"name": f"self_{n}", "graph": "decoder", "input": f"self_{n}",
                       "output": f"new_self_{n}", "shape": [1, heads, t_max, head_dim],
                       "dtype": "float32", "update": "append", "axis": 2})
    sizes = {"tokens": [1, block] if block else [1]}
    return {
        "schema_version": 1, "family": "whisper", "pipeline": "whisper_window",
        "source": parts.source,
        "audio": {"sample_rate": SAMPLE_RATE, "chunk_samples": 5 * 512,  # 160 ms: five VAD frames
                  "lookahead_samples": 0, "frame_rate": SAMPLE_RATE / HOP,
                  "window_samples": n_frames * HOP},
        "graphs": [graph_entry("encoder", out / "encoder.onnx"),
                   graph_entry("decoder", out / "decoder.onnx", sizes=sizes)],
        "states": states,
        "tokenizer": {"file": "tokenizer.json", "special": parts.special},
        "decoding": {"max_tokens": t_max, "prompt": list(parts.prompt),
                     "suppress": list(parts.suppress),
                     "suppress_at_begin": list(parts.suppress_at_begin),
                     **({"languages": parts.languages} if parts.languages else {})},
        "extra": {"block_tokens": block,  # K of the decoder's block size; 0: step only
                  **({"fused": fused} if fused else {}),  # operators fused per graph
                  "model": {"d_model": d, "encoder_layers": cfg.encoder_layers,
                            "decoder_layers": cfg.decoder_layers, "heads": heads,
                            "vocab": norm.vocab_size}},
    }
