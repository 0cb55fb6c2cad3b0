"""moonshine_streaming as three fixed-shape step graphs with explicit state (DESIGN.md section 2).

- `encoder`: N x 320 raw samples (N encoder frames of 20 ms) and their validity -> N encoder
  frames (after final_norm) and their validity. State: the two causal-conv input carries and, per
  layer, a history of that layer's last `past + future` input frames with validity flags. A layer
  that looks `future` frames ahead emits the frame `future` steps behind its newest input, so
  outputs are delayed by the sum of the lookaheads; validity travels with every frame, so the
  first outputs after start are marked invalid and feeding valid=0 chunks releases the last real
  frames. Keys with validity 0 are replaced by a large finite negative score (never -inf: an
  all-masked row gives uniform weights, not NaN, and its output is marked invalid anyway).
- `memory`: encoder frames and their absolute frame positions -> per decoder layer the
  cross-attention K/V rows of `proj(frame + pos_emb[position])`, which the runtime appends to its
  static buffers (transformers adds pos_emb in place; here nothing is mutated).
- `decoder`: T tokens at `position .. position+T-1` (T symbolic, run at 1 and K), per-layer self
  K/V `[1, kv_heads, T_max, head_dim]` and cross K/V `[1, kv_heads, M_max, head_dim]` with
  `memory_length` valid rows -> logits `[1, T, vocab]` and the T new self K/V rows (RoPE applied
  before caching); token j attends the cached rows before `position` and its own rows 0..j. At K
  one pass teacher-forces a prefix or re-scores a previous hypothesis (DESIGN.md section 8).
  With the greedy head (bundles since issue 8) it also returns `choice` and `choice_logprob`
  `[1, T, 2]`: the greedy id and its log-probability with no rule (column 0) and with the end
  token suppressed (column 1).

The modules reuse the transformers model's weights and its rotary helpers; attention is computed
here over plain tensors, so no Cache object or mask factory is traced.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.moonshine_streaming.modeling_moonshine_streaming import (
    MoonshineStreamingForConditionalGeneration, apply_rotary_pos_emb, repeat_kv)

from edgestream.export.greedy_head import greedy_choices, suppressed

WINDOW_SEMANTICS = ("transformers", "inclusive")
GREEDY_HEAD = True  # the decoder ends with the greedy head (False: logits only, as before)


def attention_spans(windows: list[list[int]], semantics: str) -> list[tuple[int, int]]:
    """(past, future) frames each encoder layer attends besides the frame itself.

    transformers' `sliding_window_mask_function` allows `0 <= q - k < left` and `0 < k - q < right`:
    window (16, 4) is 15 past and 3 future frames. "inclusive" reads it as 16 past and 4 future.
    """
    if semantics not in WINDOW_SEMANTICS:
        raise ValueError(f"window_semantics {semantics!r}: use one of "
                         f"{', '.join(WINDOW_SEMANTICS)}")
    spans = []
    for left, right in windows:
        if left < 1 or right < 0:
            raise ValueError(f"sliding window ({left}, {right}) is not supported: left must be "
                             ">= 1 and right >= 0")
        inclusive = semantics == "inclusive"
        spans.append((left, right) if inclusive else (left - 1, max(right - 1, 0)))
    return spans


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, -1, head_dim).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
            scaling: float) -> torch.Tensor:
    """Softmax attention where `allowed` is False -> the most negative finite score."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    scores = torch.where(allowed, scores, torch.finfo(scores.dtype).min)
    ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
    b, _, t, _ = ctx.shape
    return ctx.transpose(1, 2).reshape(b, t, -1)


def _causal_conv(conv: nn.Conv1d, carry: torch.Tensor, x: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' left-padded causal conv, with the last `left_pad` inputs carried instead of
    zeros. Every chunk holds an even number of inputs, so the stride-2 phase never shifts."""
    x = torch.cat([carry, x], dim=2)
    y = F.conv1d(x, conv.weight, conv.bias, stride=conv.stride, dilation=conv.dilation)
    return y, x[:, :, x.shape[2] - carry.shape[2]:]


class MoonshineEncoderStep(nn.Module):
    """(audio, valid, conv carries, per-layer history) -> (frames, valid, new state)."""

    def __init__(self, model: MoonshineStreamingForConditionalGeneration, chunk_frames: int,
                 spans: list[tuple[int, int]]) -> None:
        super().__init__()
        enc = model.model.encoder
        self.embedder, self.layers, self.final_norm = enc.embedder, enc.layers, enc.final_norm
        self.n = chunk_frames
        self.spans = list(spans)
        for i, (past, future) in enumerate(self.spans):
            # query n sits at history index past + n and sees keys n .. n + past + future
            keys = torch.arange(past + future + chunk_frames)[None, :]
            queries = torch.arange(chunk_frames)[:, None]
            band = (keys >= queries) & (keys <= queries + past + future)
            self.register_buffer(f"band_{i}", band.view(1, 1, chunk_frames, -1), persistent=False)

    def _layer(self, i: int, x: torch.Tensor, valid: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        layer, past, n = self.layers[i], self.spans[i][0], self.n
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = _heads(attn.q_proj(h[:, past:past + n]), attn.head_dim)
        k = repeat_kv(_heads(attn.k_proj(h), attn.head_dim), attn.num_key_value_groups)
        v = repeat_kv(_heads(attn.v_proj(h), attn.head_dim), attn.num_key_value_groups)
        allowed = getattr(self, f"band_{i}") & (valid > 0.5).view(1, 1, 1, -1)
        out = x[:, past:past + n] + attn.o_proj(_attend(q, k, v, allowed, attn.scaling))
        out = out + layer.mlp(layer.post_attention_layernorm(out))
        return out, valid[:, past:past + n]

    def forward(self, audio: torch.Tensor, valid: torch.Tensor, conv1_carry: torch.Tensor,
                conv2_carry: torch.Tensor, *history: torch.Tensor) -> tuple[torch.Tensor, ...]:
        emb = self.embedder
        x = emb.cmvn(audio.view(1, -1, emb.frame_len))  # 5 ms frames; no cross-frame state
        x = F.silu(emb.linear(emb.comp(x))).transpose(1, 2)
        x, carry1 = _causal_conv(emb.conv1, conv1_carry, x)
        x, carry2 = _causal_conv(emb.conv2, conv2_carry, F.silu(x))
        x = x.transpose(1, 2)
        states = [carry1, carry2]
        rest = iter(history)
        for i, (past, future) in enumerate(self.spans):
            if past + future:
                x = torch.cat([next(rest), x], dim=1)
                valid = torch.cat([next(rest), valid], dim=1)
                states += [x[:, self.n:], valid[:, self.n:]]
            x, valid = self._layer(i, x, valid)
        return (self.final_norm(x), valid, *states)


class MoonshineMemoryStep(nn.Module):
    """(frames, positions) -> cross-attention K, V rows for every decoder layer."""

    def __init__(self, model: MoonshineStreamingForConditionalGeneration) -> None:
        super().__init__()
        self.dec = model.model.decoder
        self.head_dim = model.config.head_dim
        self.max_pos = self.dec.pos_emb.num_embeddings

    def forward(self, frames: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # rows the runtime does not append (invalid frames) may carry any position
        x = self.dec.proj(frames + self.dec.pos_emb(positions.clamp(0, self.max_pos - 1)))
        out: list[torch.Tensor] = []
        for layer in self.dec.layers:
            attn = layer.encoder_attn
            out += [_heads(attn.k_proj(x), self.head_dim), _heads(attn.v_proj(x), self.head_dim)]
        return tuple(out)


class MoonshineDecoderStep(nn.Module):
    """T tokens (T symbolic: the runtime runs it at 1, the step, and at K, the block) with static
    self K/V and cross K/V buffers; returns logits `[1, T, vocab]` and the T new self K/V rows.
    One graph for both sizes stores the decoder weights once (DESIGN.md section 2).

    `pad_head_dim_to_multiple_of` only zero-pads q, k and v inside transformers' attention (the
    scaling stays that of the true head_dim), so it changes nothing numerically and is not done.
    RoPE is computed, not looked up, so a block overhanging the cache end (positions past
    `max_tokens`) runs as is; the runtime never uses those outputs.
    """

    def __init__(self, model: MoonshineStreamingForConditionalGeneration, max_tokens: int,
                 max_memory_frames: int, eos: int = -1, greedy_head: bool | None = None) -> None:
        super().__init__()
        self.greedy_head = GREEDY_HEAD if greedy_head is None else greedy_head
        # greedy head rule sets: none (column 0), and the end token suppressed (column 1: a
        # decode of exactly N tokens, as benchmarks with random weights run)
        self.eos = [eos] if eos >= 0 else []
        self.dec = model.model.decoder
        self.proj_out = model.proj_out
        self.head_dim = model.config.head_dim
        self.register_buffer("token_rows", torch.arange(max_tokens), persistent=False)
        self.register_buffer("memory_rows", torch.arange(max_memory_frames), persistent=False)

    def forward(self, token: torch.Tensor, position: torch.Tensor, memory_length: torch.Tensor,
                *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n, k = len(self.dec.layers), token.shape[1]
        self_kv, cross_kv = states[:2 * n], states[2 * n:]
        x = self.dec.embed_tokens(token)
        offsets = torch.arange(k, device=token.device)
        cos, sin = self.dec.rotary_emb(x, (position + offsets).view(1, k))
        # cached rows before `position` (for every block token), plus block rows 0..j (causal)
        cached_ok = (self.token_rows < position).view(1, -1).expand(k, -1)
        own_ok = offsets.view(1, -1) <= offsets.view(-1, 1)
        self_ok = torch.cat([cached_ok, own_ok], dim=1).view(1, 1, k, -1)
        cross_ok = (self.memory_rows < memory_length).view(1, 1, 1, -1)
        rows: list[torch.Tensor] = []
        for i, layer in enumerate(self.dec.layers):
            sa = layer.self_attn
            h = layer.input_layernorm(x)
            q = _heads(sa.q_proj(h), self.head_dim)
            key = _heads(sa.k_proj(h), self.head_dim)
            v = _heads(sa.v_proj(h), self.head_dim)
            q, key = apply_rotary_pos_emb(q, key, cos, sin)
            keys = torch.cat([self_kv[2 * i], key], dim=2)
            values = torch.cat([self_kv[2 * i + 1], v], dim=2)
            x = x + sa.o_proj(_attend(q, keys, values, self_ok, sa.scaling))
            ca = layer.encoder_attn
            q = _heads(ca.q_proj(layer.post_attention_layernorm(x)), self.head_dim)
            x = x + ca.o_proj(_attend(q, cross_kv[2 * i], cross_kv[2 * i + 1], cross_ok,
                                      ca.scaling))
            x = x + layer.mlp(layer.final_layernorm(x))
            rows += [key, v]
        logits = self.proj_out(self.dec.norm(x))
        if not self.greedy_head:
            return (logits, *rows)
        return (logits, *greedy_choices([logits, suppressed(logits, self.eos)]), *rows)
