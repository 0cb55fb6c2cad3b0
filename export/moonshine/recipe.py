"""The moonshine_streaming recipe: load from a folder or hub id, export the encoder, memory and
decoder step graphs, describe the bundle (pipeline `streaming_encoder_decoder`).

How the runtime drives the bundle (recorded in the manifest's `extra.protocol` too):
1. `encoder` per chunk of `audio.chunk_samples` samples with `valid` = 1 for every encoder frame
   whose newest 5 ms frame (samples `[320 i, 320 i + 80)`) holds real audio, else 0 (zero-pad the
   audio). Its states are all `replace`. Output frame j is real when `frames_valid[0, j]` is 1;
   the first `extra.encoder_lookahead_frames` outputs after start are not.
2. At end of speech feed `extra.flush_chunks` chunks of zeros with valid = 0; they release the last
   real frames.
3. `memory` on the chunk's `frames` with `positions` = the absolute index of each real frame
   (its row in the memory buffer: 0, 1, 2, ... from the start of the utterance); append only the
   rows of real frames, in order, at the buffer's current length (the `cross_*` states, axis 2),
   and add their count to the length (at most `extra.max_memory_frames`).
4. `decoder` per token: `position` = token index, `memory_length` = rows appended so far; append
   its `new_self_*` rows at `position`.
5. The same graph at K tokens (`dims.tokens` lists 1 and K when `extra.block_tokens` > 0),
   `position` = the first one's index; append its K `new_self_*` rows at `position` (rows past a
   shorter prefix or past `max_tokens` are never read): teacher-force a prefix, or re-score the
   previous hypothesis in one pass. One graph, so the decoder weights are stored once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, MoonshineStreamingForConditionalGeneration

from edgestream.export.errors import ExportError
from edgestream.export.moonshine.graphs import (
    WINDOW_SEMANTICS, MoonshineDecoderStep, MoonshineEncoderStep, MoonshineMemoryStep,
    attention_spans)
from edgestream.export.onnx_export import export_graph, graph_entry
from edgestream.export.sources import ResolvedSource

log = logging.getLogger(__name__)

FAMILY = "moonshine_streaming"
MAX_CHUNK_FRAMES = 16
BLOCK_TOKENS = 16  # tokens per decoder_block pass (DESIGN.md section 8)


@dataclass(frozen=True)
class MoonshineParts:
    """What the recipe needs from a source."""

    model: MoonshineStreamingForConditionalGeneration
    tokenizer_json: str
    special: dict[str, int]
    source: dict[str, str]


def _first(value: int | list[int] | None) -> int | None:
    return value[0] if isinstance(value, (list, tuple)) else value


def load_moonshine(src: ResolvedSource, revision: str | None = None) -> MoonshineParts:
    """Load a moonshine_streaming model and its tokenizer from a local folder or a hub id."""
    if src.kind not in ("transformers", "hub"):
        raise ExportError(f"{src.text}: moonshine_streaming loads from a transformers folder or a "
                          f"hub id, not a {src.kind} source")
    where = str(src.path) if src.path else src.text
    try:
        model = MoonshineStreamingForConditionalGeneration.from_pretrained(
            where, revision=revision, dtype=torch.float32)
        tokenizer_json = AutoTokenizer.from_pretrained(
            where, revision=revision).backend_tokenizer.to_str()
    except (OSError, ValueError) as e:
        raise ExportError(f"{where}: cannot load a moonshine_streaming model and tokenizer "
                          f"({e})") from e
    model.eval()
    cfg = model.config
    special = {"bos": _first(cfg.bos_token_id), "eos": _first(cfg.eos_token_id),
               "pad": _first(cfg.pad_token_id)}
    special["decoder_start"] = (cfg.decoder_start_token_id if cfg.decoder_start_token_id
                                is not None else special["bos"])
    missing = [k for k in ("eos", "decoder_start") if special[k] is None]
    if missing:
        raise ExportError(f"{where}/config.json: special token ids {missing} are not set")
    source = {"id": src.text, "kind": src.kind,
              "revision": str(getattr(cfg, "_commit_hash", "") or revision or "")}
    return MoonshineParts(model=model, tokenizer_json=tokenizer_json,
                          special={k: int(v) for k, v in special.items() if v is not None},
                          source=source)


def _check_options(model: MoonshineStreamingForConditionalGeneration, chunk_frames: int,
                   window_semantics: str, max_memory_frames: int, max_tokens: int,
                   block_tokens: int) -> None:
    cfg = model.config
    if block_tokens != 0 and block_tokens < 2:
        raise ExportError(f"block_tokens {block_tokens}: use 0 (step only) or >= 2")
    if not 1 <= chunk_frames <= MAX_CHUNK_FRAMES:
        raise ExportError(f"chunk_frames {chunk_frames}: use 1..{MAX_CHUNK_FRAMES} encoder frames "
                          "(20..320 ms)")
    if window_semantics not in WINDOW_SEMANTICS:
        raise ExportError(f"window_semantics {window_semantics!r}: use one of "
                          f"{', '.join(WINDOW_SEMANTICS)}")
    limit = cfg.max_position_embeddings
    if not 1 <= max_memory_frames <= limit:
        raise ExportError(f"max_memory_frames {max_memory_frames}: use 1..{limit} "
                          "(the decoder's pos_emb has max_position_embeddings rows)")
    if not 2 <= max_tokens <= limit:
        raise ExportError(f"max_tokens {max_tokens}: use 2..{limit}")
    if cfg.num_key_value_heads != cfg.num_attention_heads:
        raise ExportError("config.json: decoder num_key_value_heads != num_attention_heads; "
                          "transformers' moonshine_streaming decoder itself cannot run that")
    rope = cfg.rope_parameters.get("rope_type", "default")
    if "dynamic" in rope or rope == "longrope":
        raise ExportError(f"config.json: rope_type {rope!r} changes with sequence length; only "
                          "static RoPE exports to a step graph")


def export_moonshine_graphs(parts: MoonshineParts, out: Path, chunk_frames: int = 4,
                            window_semantics: str = "transformers",
                            max_memory_frames: int = 1500, max_tokens: int = 256,
                            block_tokens: int = BLOCK_TOKENS) -> dict:
    """Write encoder.onnx, memory.onnx, decoder.onnx (token axis run at 1 and `block_tokens`;
    0: the step only) and tokenizer.json into `out`; return the manifest dict (without parity,
    which the caller adds after checking). A `block_tokens` above `max_tokens` is cut to it."""
    model = parts.model
    _check_options(model, chunk_frames, window_semantics, max_memory_frames, max_tokens,
                   block_tokens)
    block = min(block_tokens, max_tokens)
    cfg, ecfg = model.config, model.config.encoder_config
    try:
        spans = attention_spans(ecfg.sliding_windows, window_semantics)
    except ValueError as e:
        raise ExportError(f"config.json encoder_config.sliding_windows: {e}") from e
    emb = model.model.encoder.embedder
    frame_samples = emb.frame_len * emb.conv1.stride[0] * emb.conv2.stride[0]
    n, d_enc = chunk_frames, ecfg.hidden_size
    lookahead = sum(f for _, f in spans)

    enc_states = [("conv1_carry", [1, d_enc, emb.conv1.left_pad]),
                  ("conv2_carry", [1, 2 * d_enc, emb.conv2.left_pad])]
    for i, (past, future) in enumerate(spans):
        if past + future:
            enc_states += [(f"hist_{i}", [1, past + future, d_enc]),
                           (f"hist_valid_{i}", [1, past + future])]
    enc_args = (torch.zeros(1, n * frame_samples), torch.ones(1, n),
                *(torch.zeros(shape) for _, shape in enc_states))
    export_graph(MoonshineEncoderStep(model, n, spans), enc_args, out / "encoder.onnx",
                 ["audio", "valid", *[name for name, _ in enc_states]],
                 ["frames", "frames_valid", *[f"new_{name}" for name, _ in enc_states]])

    layers, heads, head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    kv = [f"{t}_{i}" for i in range(layers) for t in "kv"]
    export_graph(MoonshineMemoryStep(model),
                 (torch.zeros(1, n, d_enc), torch.arange(n).view(1, n)), out / "memory.onnx",
                 ["frames", "positions"], [f"cross_{name}" for name in kv])
    self_kv = [torch.zeros(1, heads, max_tokens, head_dim) for _ in kv]
    cross_kv = [torch.zeros(1, heads, max_memory_frames, head_dim) for _ in kv]
    # traced at 2 tokens: torch.export specializes an example size of 1
    step = MoonshineDecoderStep(model, max_tokens, max_memory_frames, parts.special["eos"])
    head = ["choice", "choice_logprob"] if step.greedy_head else []  # the greedy head
    export_graph(step,
                 (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                  torch.ones(1, dtype=torch.long), *self_kv, *cross_kv),
                 out / "decoder.onnx",
                 ["token", "position", "memory_length", *[f"self_{x}" for x in kv],
                  *[f"cross_{x}" for x in kv]],
                 ["logits", *head, *[f"new_self_{x}" for x in kv]],
                 dynamic={"token": (1, "tokens", max_tokens)})
    (out / "tokenizer.json").write_text(parts.tokenizer_json)

    states = [{"name": name, "graph": "encoder", "input": name, "output": f"new_{name}",
               "shape": shape, "dtype": "float32", "init": 0.0, "update": "replace"}
              for name, shape in enc_states]
    for x in kv:
        states.append({"name": f"cross_{x}", "graph": "decoder", "input": f"cross_{x}",
                       "output_graph": "memory", "output": f"cross_{x}",
                       "shape": [1, heads, max_memory_frames, head_dim], "dtype": "float32",
                       "init": 0.0, "update": "append", "axis": 2})
        states.append({"name": f"self_{x}", "graph": "decoder", "input": f"self_{x}",
                       "output": f"new_self_{x}", "shape": [1, heads, max_tokens, head_dim],
                       "dtype": "float32", "init": 0.0, "update": "append", "axis": 2})
    sample_rate = ecfg.sample_rate
    return {
        "schema_version": 1, "family": FAMILY, "pipeline": "streaming_encoder_decoder",
        "source": parts.source,
        "audio": {"sample_rate": sample_rate, "chunk_samples": n * frame_samples,
                  "lookahead_samples": lookahead * frame_samples,
                  "frame_rate": sample_rate / frame_samples},
        "graphs": [graph_entry("encoder", out / "encoder.onnx"),
                   graph_entry("memory", out / "memory.onnx"),
                   graph_entry("decoder", out / "decoder.onnx",
                               sizes={"tokens": [1, block] if block else [1]})],
        "states": states,
        "tokenizer": {"file": "tokenizer.json", "special": parts.special},
        "decoding": {"max_tokens": max_tokens, "prompt": [parts.special["decoder_start"]]},
        "extra": {
            "chunk_frames": n, "frame_samples": frame_samples,
            "window_semantics": window_semantics,
            "sliding_windows": [list(w) for w in ecfg.sliding_windows],
            "attention_spans": [list(s) for s in spans],  # (past, future) frames per layer
            "encoder_lookahead_frames": lookahead,
            "flush_chunks": math.ceil(lookahead / n),
            "max_memory_frames": max_memory_frames,
            "block_tokens": block,  # K of the decoder's block size; 0: step only
            "protocol": {
                "valid": f"encoder frame i is real when samples [{frame_samples} i, "
                         f"{frame_samples} i + {emb.frame_len}) hold audio; flush with zeros",
                "memory": "append rows where frames_valid is 1 at memory_length; positions = "
                          "each real frame's row index",
                "decoder": "1 or K tokens from position (dims.tokens); append the new_self_* "
                           "rows at position; memory_length = appended rows"},
            "model": {"d_model_encoder": d_enc, "d_model_decoder": cfg.hidden_size,
                      "encoder_layers": ecfg.num_hidden_layers, "decoder_layers": layers,
                      "encoder_heads": ecfg.num_attention_heads, "decoder_heads": heads,
                      "head_dim": head_dim, "vocab": cfg.vocab_size,
                      "partial_rotary_factor": cfg.rope_parameters.get("partial_rotary_factor",
                                                                        1.0)},
        },
    }
