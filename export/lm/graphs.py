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
    """What an attention layer sees as its cache during one traced pass: the cached rows (graph
    inputs) followed by this pass's rows, which are kept as graph outputs."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.past = past
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        self.new[layer_idx] = (key, value)
        k, v = self.past[layer_idx]
        return torch.cat([k, key], dim=2), torch.cat([v, value], dim=2)


class DecoderLMGraph(nn.Module):
    """tokens + positions + mask + cached rows -> logits + new rows, for attention-only
    decoders (llama, qwen3)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layers = list(range(model.config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        base = self.model.model
        past = {i: (states[2 * n], states[2 * n + 1]) for n, i in enumerate(self.layers)}
        cache = _RowCache(past)
        hidden = base.embed_tokens(input_ids)
        # own rows: causal within the pass (token j sees rows 0..j), built here so the mask
        # input has no derived dimension
        t = torch.arange(input_ids.shape[1], device=input_ids.device)
        own = torch.where(t.view(1, -1) <= t.view(-1, 1), 0.0, torch.finfo(hidden.dtype).min)
        attention_mask = torch.cat([attention_mask, own.view(1, 1, *own.shape).to(hidden.dtype)],
                                   dim=3)
        rope = base.rotary_emb(hidden, position_ids=position_ids)
        for layer in base.layers:
            hidden = layer(hidden, attention_mask=attention_mask, position_ids=position_ids,
                           cache=cache, position_embeddings=rope)
        logits = self.model.lm_head(base.norm(hidden))
        rows: list[torch.Tensor] = []
        for i in self.layers:
            rows += list(cache.new[i])
        return (logits, *rows)
