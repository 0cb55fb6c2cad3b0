"""Whisper as two fixed-shape graphs with explicit state.

- `encoder`: log-mel `[1, n_mels, 3000]` -> per-layer cross-attention K/V `[1, heads, 1500, head_dim]`.
  Projecting K/V once per window here saves every decoder step from doing it.
- `decoder`: one token at `position` plus per-layer self-attention K/V `[1, heads, T_max, head_dim]`
  -> logits `[1, vocab]` and only the new K/V row, which the runtime writes into its buffer at
  `position`.
- greedy head (bundles since issue 8): the decoder also returns `choice` and `choice_logprob`
  `[1, T, 2]`, the greedy choice of every token row under the fixed suppression rules without
  timestamps (column 0) and with the begin suppression too (column 1), with its log-probability,
  so a device step sends 2 numbers per token across the bus instead of the logits (which remain
  an output: for sampling, the no-speech probe and parity checks).
- timestamp head (bundles since issue 8's CPU follow-up): column 2 of `choice` is the choice under
  Whisper's timestamp rules, whose history dependence arrives as a tiny input `timestamp_state`
  `[1, T, 2]` int64 per token row: the kind of the last two tokens (0 nothing generated yet, 1
  last was text, 2 a timestamp after text, 3 two timestamps or a lone opening one) and the last
  timestamp token so far (-1: none). A timestamped greedy step then also returns only (id,
  log-probability); bundles without the input decode timestamps through the logits.
- `decoder_block` (optional): the same step over K tokens at positions `position .. position+K-1`
  -> logits `[1, K, vocab]` and the K new rows `[1, heads, K, head_dim]` (written at `position`).
  Token j attends the cached rows before `position` and block rows 0..j, so one pass
  teacher-forces a prefix or re-scores a previous hypothesis (DESIGN.md section 8). It reads the
  same self and cross K/V buffers through inputs of the same names as the one-token step.

The step modules reuse the transformers model's own weights but compute attention themselves over
plain tensors: no Cache object or mask factory is traced, so the graph has no dynamic axes and no
cache bookkeeping (DESIGN.md section 2). Parity against the transformers forward proves the two agree.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import WhisperForConditionalGeneration

from edgestream.export.greedy_head import greedy_choices, suppressed, timestamp_rules


GREEDY_HEAD = True  # export the greedy head (False: the logits-only decoder of older bundles)


class WhisperEncoderGraph(nn.Module):
    """mel -> cross K/V for every decoder layer."""

    def __init__(self, model: WhisperForConditionalGeneration) -> None:
        super().__init__()
        self.encoder = model.model.encoder
        self.cross = nn.ModuleList(layer.encoder_attn for layer in model.model.decoder.layers)
        self.heads = model.config.decoder_attention_heads

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.encoder(input_features=mel).last_hidden_state
        out: list[torch.Tensor] = []
        b, t, d = hidden.shape
        for attn in self.cross:
            k = attn.k_proj(hidden).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            v = attn.v_proj(hidden).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            out += [k, v]
        return tuple(out)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)


class WhisperDecoderStep(nn.Module):
    """T decoder tokens at `position .. position+T-1` (T symbolic: the runtime runs it at 1, the
    one-token step, and at K, the block) with static self-attention KV; returns logits
    `[1, T, vocab]` and the T new K/V rows. One graph for both sizes stores every decoder weight
    once (DESIGN.md section 2).

    Positions past the model's last one are clamped for the embedding lookup: their outputs are
    meaningless but finite, and the runtime never uses them (a block may overhang the cache end).
    """

    def __init__(self, model: WhisperForConditionalGeneration, suppress: Sequence[int] = (),
                 suppress_at_begin: Sequence[int] = (), timestamp_begin: int = 0,
                 greedy_head: bool | None = None, eot: int = -1, no_timestamps: int = -1
                 ) -> None:
        super().__init__()
        dec = model.model.decoder
        self.greedy_head = GREEDY_HEAD if greedy_head is None else greedy_head
        vocab = model.proj_out.weight.shape[0]
        # the greedy head's fixed rules: the generation config's suppression, and no timestamp
        # tokens (the rules of a decode without timestamps); column 1 adds the begin suppression
        self.never = [t for t in suppress if 0 <= t < vocab]
        self.begin = [t for t in suppress_at_begin if 0 <= t < vocab]
        self.timestamp_begin = timestamp_begin if 0 < timestamp_begin < vocab else vocab
        # column 2, Whisper's timestamp rules (needs the end and no-timestamps tokens)
        self.timestamp_head = self.greedy_head and 0 <= eot < self.timestamp_begin < vocab \
            and 0 <= no_timestamps < vocab
        self.eot, self.no_timestamps = eot, no_timestamps
        self.dec = dec
        self.heads = model.config.decoder_attention_heads
        self.embed_scale = float(dec.embed_scale)
        self.t_max = dec.embed_positions.weight.shape[0]
        # logits = h @ E^T; kept tied so the file carries the vocabulary matrix once.
        self.proj = model.proj_out
        self.register_buffer("rows", torch.arange(self.t_max), persistent=False)

    def _self_attention(self, layer: nn.Module, x: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, valid: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = layer.self_attn
        q = _split_heads(attn.q_proj(x) * attn.scaling, self.heads)
        k_new = _split_heads(attn.k_proj(x), self.heads)
        v_new = _split_heads(attn.v_proj(x), self.heads)
        # Attend over the cached rows before `position` plus this step's own rows; concatenation
        # instead of an in-graph cache write keeps the cache an input only.
        keys = torch.cat([k_cache, k_new], dim=2)
        values = torch.cat([v_cache, v_new], dim=2)
        scores = torch.matmul(q, keys.transpose(-1, -2)) + valid
        ctx = torch.matmul(torch.softmax(scores, dim=-1), values)
        ctx = ctx.transpose(1, 2).reshape(x.shape)
        return attn.out_proj(ctx), k_new, v_new

    def _cross_attention(self, layer: nn.Module, x: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor) -> torch.Tensor:
        attn = layer.encoder_attn
        q = _split_heads(attn.q_proj(x) * attn.scaling, self.heads)
        ctx = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1), v)
        return attn.out_proj(ctx.transpose(1, 2).reshape(x.shape))

    def forward(self, tokens: torch.Tensor, position: torch.Tensor,
                *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        stamps = None
        if self.timestamp_head:  # `timestamp_state` comes right after `position`
            stamps, states = states[0], states[1:]
        n = len(self.dec.layers)
        self_kv, cross_kv = states[: 2 * n], states[2 * n:]
        x = self.dec.embed_tokens(tokens) * self.embed_scale
        offsets = torch.arange(tokens.shape[1], device=tokens.device)
        where = (position + offsets).clamp(max=self.t_max - 1)
        x = x + self.dec.embed_positions.weight.index_select(0, where).unsqueeze(0)
        # additive mask [T, T_max cached rows + T own rows]: cached rows at or after `position`
        # are empty; own rows are causal (token j sees own rows 0..j)
        neg = torch.finfo(x.dtype).min
        cached = torch.where(self.rows.view(1, -1) < position, 0.0, neg).to(x.dtype)
        cached = cached.expand(tokens.shape[1], -1)
        own = torch.where(offsets.view(1, -1) <= offsets.view(-1, 1), 0.0, neg).to(x.dtype)
        valid = torch.cat([cached, own], dim=1).unsqueeze(0).unsqueeze(0)
        new_rows: list[torch.Tensor] = []
        for i, layer in enumerate(self.dec.layers):
            h, k_new, v_new = self._self_attention(
                layer, layer.self_attn_layer_norm(x), self_kv[2 * i], self_kv[2 * i + 1], valid)
            x = x + h
            x = x + self._cross_attention(layer, layer.encoder_attn_layer_norm(x),
                                          cross_kv[2 * i], cross_kv[2 * i + 1])
            h = layer.final_layer_norm(x)
            x = x + layer.fc2(layer.activation_fn(layer.fc1(h)))
            new_rows += [k_new, v_new]
        logits = self.proj(self.dec.layer_norm(x))
        if not self.greedy_head:
            return (logits, *new_rows)
        fixed = suppressed(logits, self.never, self.timestamp_begin)
        first = suppressed(fixed, self.begin)
        if stamps is None:
            return (logits, *greedy_choices([fixed, first]), *new_rows)
        base = suppressed(logits, [*self.never, self.no_timestamps])
        stamped = timestamp_rules(base, suppressed(base, self.begin), stamps,
                                  self.timestamp_begin, self.eot)
        return (logits, *greedy_choices([fixed, first, stamped]), *new_rows)
