"""Hybrid decoder LMs: Gated DeltaNet linear attention interleaved with gated full attention, and
(for the MoE variants) routed experts. Qwen3-Next (`qwen3_next`), Qwen3.5 (`qwen3_5`, the text
backbone of a `qwen3_5` checkpoint) and Qwen3.5-MoE (`qwen3_5_moe`, the text backbone of
Intern-S2-Preview).

The graph keeps DecoderLMGraph's contract (export/lm/graphs.py): ids, absolute positions and the
runtime's slot mask in; logits and only this pass's K/V rows out for full-attention layers. Each
linear-attention layer adds two `replace` states, its conv carry and its fp32 delta-rule memory
(export/lm/deltanet.py). Those cannot be masked back like KV rows, so the runtime rolls them back
by snapshot and re-feed, the path LFM2's conv carries already use (runtime/responder/engine.py);
chunks are exactly K tokens, so no padding ever enters them.

MoE layers run through transformers' `batched_mm` experts (a gather of each routed expert's
weights and one batched matmul): static shapes, unlike the default loop over the experts hit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgestream.export.errors import ExportError
from edgestream.export.lm.deltanet import GatedDeltaNetPass

# model_type of a loaded *ForCausalLM -> family name in the manifest. A `qwen3_5`/`qwen3_5_moe`
# checkpoint (vision + text) loads its text backbone, whose config says `*_text`.
HYBRID_FAMILIES = {"qwen3_next": "qwen3_next", "qwen3_5": "qwen3_5", "qwen3_5_text": "qwen3_5",
                   "qwen3_5_moe": "qwen3_5_moe", "qwen3_5_moe_text": "qwen3_5_moe"}


@dataclass(frozen=True)
class HybridLayout:
    """Graph state names and shapes in input order, and which are replaced every pass."""

    kinds: list[str]  # per layer: "attention" or "linear_attention"
    names: list[str]
    shapes: list[list[int]]
    recurrent: list[dict[str, str]]  # {"input", "output"} of every replace state


class _RowCache:
    """The cache a full-attention layer sees during one traced pass: cached rows (graph inputs)
    then this pass's rows, which become graph outputs."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.past = past
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        self.new[layer_idx] = (key, value)
        k, v = self.past[layer_idx]
        return torch.cat([k, key], dim=2), torch.cat([v, value], dim=2)


def hybrid_kinds(config: object) -> list[str]:
    types = list(getattr(config, "layer_types", None) or [])
    if len(types) != config.num_hidden_layers or \
            not set(types) <= {"linear_attention", "full_attention"}:
        raise ExportError(f"config.json: layer_types {types!r} must name linear_attention or "
                          f"full_attention for each of the {config.num_hidden_layers} layers; "
                          "this hybrid layout has no graph yet")
    return ["linear_attention" if t == "linear_attention" else "attention" for t in types]


class HybridLMGraph(nn.Module):
    """tokens + positions + mask + per-layer state -> logits + new K/V rows + new carries.
    State inputs in layer order: attention k, v; linear attention conv, rec."""

    def __init__(self, model: nn.Module, max_tokens: int) -> None:
        super().__init__()
        self.model = model
        self.kinds = hybrid_kinds(model.config)
        self.deltanet = nn.ModuleDict({
            str(i): GatedDeltaNetPass(layer.linear_attn, max_tokens)
            for i, (layer, kind) in enumerate(zip(model.model.layers, self.kinds))
            if kind == "linear_attention"})

    def layout(self, kv_slots: int) -> HybridLayout:
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        names, shapes, recurrent = [], [], []
        for i, kind in enumerate(self.kinds):
            if kind == "attention":
                names += [f"k_{i}", f"v_{i}"]
                shapes += [[1, cfg.num_key_value_heads, kv_slots, head_dim]] * 2
            else:
                conv, rec = self.deltanet[str(i)].state_shapes()
                names += [f"conv_{i}", f"rec_{i}"]
                shapes += [conv, rec]
                recurrent += [{"input": n, "output": f"new_{n}"} for n in names[-2:]]
        return HybridLayout(list(self.kinds), names, shapes, recurrent)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        base = self.model.model
        past, carries, j = {}, {}, 0
        for i, kind in enumerate(self.kinds):
            if kind == "attention":
                past[i] = (states[j], states[j + 1])
            else:
                carries[i] = (states[j], states[j + 1])
            j += 2
        cache = _RowCache(past)
        hidden = base.embed_tokens(input_ids)
        t = torch.arange(input_ids.shape[1], device=input_ids.device)
        own = torch.where(t.view(1, -1) <= t.view(-1, 1), 0.0, torch.finfo(hidden.dtype).min)
        mask = torch.cat([attention_mask, own.view(1, 1, *own.shape).to(hidden.dtype)], dim=3)
        rope = base.rotary_emb(hidden, position_ids)
        new_carries = {}
        # the decoder layer's own sequence (norm, mixer, residual, norm, MLP/MoE, residual),
        # with the linear-attention mixer swapped for the exportable pass
        for i, (layer, kind) in enumerate(zip(base.layers, self.kinds)):
            residual = hidden
            x = layer.input_layernorm(hidden)
            if kind == "attention":
                x, _ = layer.self_attn(hidden_states=x, attention_mask=mask,
                                       position_ids=position_ids, cache=cache,
                                       position_embeddings=rope)
            else:
                x, conv, rec = self.deltanet[str(i)](x, *carries[i])
                new_carries[i] = (conv, rec)
            hidden = residual + x
            residual = hidden
            x = layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = residual + (x[0] if isinstance(x, tuple) else x)
        logits = self.model.lm_head(base.norm(hidden))
        out: list[torch.Tensor] = []
        for i, kind in enumerate(self.kinds):
            out += list(cache.new[i] if kind == "attention" else new_carries[i])
        return (logits, *out)


def prepare_hybrid(model: nn.Module) -> None:
    """Route MoE layers through transformers' static-shape `batched_mm` experts (the same sums
    as the default implementation, which loops over the experts a batch hits)."""
    if getattr(model.config, "num_experts", 0):
        model.set_experts_implementation("batched_mm")
