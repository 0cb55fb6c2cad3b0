"""A decoder-only LM as one ONNX graph whose token axis is the only symbolic dimension: run with
1 token it is the decode step, with K tokens the prefill chunk (DESIGN.md section 2: one set of
weights, two sizes).

Inputs: `input_ids [1, T]`, `position_ids [1, T]` (absolute positions: RoPE is applied before the
rows are cached, so where a row sits in the ring does not matter), `attention_mask [1, 1, T, C+T]`
(additive: the first C columns are the cache slots, the last T this pass's own rows; the runtime
builds it from its slot bookkeeping, so sinks, window and rollback are all runtime decisions) and
per attention layer `k_i`, `v_i [1, kv_heads, C, head_dim]`. Outputs: `logits [1, T, vocab]` and
only this pass's rows `new_k_i`, `new_v_i [1, kv_heads, T, head_dim]`; the runtime writes them
into its ring buffers. The cache is never copied through the graph.

Transformers' own decoder layers run inside: `_RowCache` stands in for its Cache object (the
attention layer asks it for "past rows + these rows"), and the explicit 4-D mask means no mask
factory is traced.
"""

from __future__ import annotations

import torch
from torch import nn


class _RowCache:
    """What a layer sees as its cache during one traced pass. Attention: the cached rows (graph
    inputs) followed by this pass's rows, which are kept as graph outputs. Short convolutions
    (LFM2): the carried last k-1 inputs (a graph input) before this pass's inputs; the last k-1
    of those are the new carry (a `replace` state)."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 conv: dict[int, torch.Tensor]) -> None:
        self.past = past
        self.conv = conv
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.new_conv: dict[int, torch.Tensor] = {}

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor:
        return self.conv[layer_idx]

    def is_recording_past(self, layer_idx: int) -> bool:
        return True  # always the concatenating path: one graph for 1 and K tokens

    def update_conv_state(self, x: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kwargs: object
                          ) -> torch.Tensor:
        full = torch.cat([self.conv[layer_idx], x], dim=-1)
        self.new_conv[layer_idx] = full[..., -self.conv[layer_idx].shape[-1]:]
        return full

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        self.new[layer_idx] = (key, value)
        k, v = self.past[layer_idx]
        return torch.cat([k, key], dim=2), torch.cat([v, value], dim=2)


def layer_kinds(config: object) -> list[str]:
    """'attention' or 'conv' per layer (LFM2 mixes them; llama/qwen3 are all attention)."""
    types = getattr(config, "layer_types", None) or []
    n = config.num_hidden_layers
    return ["conv" if i < len(types) and types[i] == "conv" else "attention" for i in range(n)]


class DecoderLMGraph(nn.Module):
    """tokens + positions + mask + per-layer state -> logits + new rows / new carries, for
    llama, qwen3 and lfm2. State inputs in layer order: attention k, v; conv carry."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.kinds = layer_kinds(model.config)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        base = self.model.model
        past, conv, j = {}, {}, 0
        for i, kind in enumerate(self.kinds):
            if kind == "attention":
                past[i], j = (states[j], states[j + 1]), j + 2
            else:
                conv[i], j = states[j], j + 1
        cache = _RowCache(past, conv)
        hidden = base.embed_tokens(input_ids)
        # own rows: causal within the pass (token j sees rows 0..j), built here so the mask
        # input has no derived dimension
        t = torch.arange(input_ids.shape[1], device=input_ids.device)
        own = torch.where(t.view(1, -1) <= t.view(-1, 1), 0.0, torch.finfo(hidden.dtype).min)
        attention_mask = torch.cat([attention_mask, own.view(1, 1, *own.shape).to(hidden.dtype)],
                                   dim=3)
        rope = base.rotary_emb(hidden, position_ids=position_ids)
        for layer, kind in zip(base.layers, self.kinds):
            # conv layers read a mask as 2-D padding flags: they get none (batch 1, no padding)
            mask = attention_mask if kind == "attention" else None
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                           cache=cache, position_embeddings=rope)
        norm = base.norm if hasattr(base, "norm") else base.embedding_norm  # lfm2's final norm
        logits = self.model.lm_head(norm(hidden))
        out: list[torch.Tensor] = []
        for i, kind in enumerate(self.kinds):
            out += list(cache.new[i]) if kind == "attention" else [cache.new_conv[i]]
        return (logits, *out)
