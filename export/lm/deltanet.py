"""Gated DeltaNet (the linear attention of Qwen3-Next and Qwen3.5) written for export: one pass of
T tokens (T = 1 for the step, T = K for the chunk; T is the graph's symbolic axis) with the conv
carry and the recurrent state as explicit inputs and outputs.

Transformers' own layer cannot be traced: its chunked path pads to 64 tokens and loops over
chunks, and its triangular solve is either `solve_triangular` or a Python loop over the chunk.
Here the whole pass is one chunk. The delta rule inside a chunk needs (I + A)^-1 for a strictly
lower-triangular A. It is computed by block doubling on A padded to P x P (P: the power of two
>= K): the inverses of the 1x1, 2x2, 4x4 ... diagonal blocks, each level from the one below as
[[X11, 0], [-X22 A21 X11, X22]]. That is log2 P levels of batched matmuls with static shapes
whatever T is, no loop over tokens, and the conditioning of ordinary triangular inversion (the
shorter Neumann product sum((-A)^n) loses everything to cancellation when keys are nearly
parallel).

State, per layer (both `replace` states, fp32):
- `conv`  [1, conv_dim, kernel - 1]: the last kernel-1 projected q/k/v inputs of the causal conv;
- `rec`   [1, value_heads, key_head_dim, value_head_dim]: the delta-rule memory S.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # the same formula as transformers' (and FLA's) l2norm: parity down to rounding
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def unit_lower_inverse(a: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """(I + a)^-1 for a strictly lower-triangular `a [B, H, T, T]`, T <= `max_tokens`, by block
    doubling on a zero-padded P x P copy (the top-left T x T block of the padded inverse is the
    inverse: the matrix is lower triangular). The copy is made by a T x P selection matmul, not
    a pad, so P stays a static size while T is symbolic."""
    t = a.shape[-1]
    p = 1 << max(0, (max_tokens - 1).bit_length())
    select = (torch.arange(t, device=a.device).view(-1, 1) ==
              torch.arange(p, device=a.device).view(1, -1)).to(a.dtype)  # [T, P]
    a = select.transpose(0, 1) @ a @ select
    lead = a.shape[:-2]
    inverse = a.new_ones(*lead, p, 1, 1)  # the p diagonal 1x1 blocks of I + a
    size = 1
    while size < p:
        n = p // (2 * size)  # blocks of 2*size at this level
        # A21 of each block: rows in its lower half, columns in its upper half
        grid = a.reshape(*lead, n, 2, size, n, 2, size)[..., :, 1, :, :, 0, :]
        same = torch.eye(n, dtype=a.dtype, device=a.device).view(n, 1, n, 1)
        a21 = (grid * same).sum(dim=-2)  # [B, H, n, size, size]
        x11, x22 = inverse[..., 0::2, :, :], inverse[..., 1::2, :, :]
        x21 = -(x22 @ a21 @ x11)
        inverse = torch.cat([torch.cat([x11, torch.zeros_like(x11)], dim=-1),
                             torch.cat([x21, x22], dim=-1)], dim=-2)
        size *= 2
    return select @ inverse.reshape(*lead, p, p) @ select.transpose(0, 1)


def gated_delta_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, state: torch.Tensor, max_tokens: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the gated delta rule over T <= `max_tokens` tokens.

    q, k `[B, T, Hk, dk]`; v `[B, T, Hv, dv]`; g (log decay, <= 0) and beta `[B, T, Hv]`;
    state `[B, Hv, dk, dv]` (fp32). Returns the output `[B, T, Hv, dv]` (input dtype) and the new
    state (fp32). Token by token this is S <- exp(g) S; S <- S + k (beta (v - S^T k))^T;
    o = S^T q / sqrt(dk): the same recurrence as transformers' per-token reference."""
    dtype = v.dtype
    rep = v.shape[2] // k.shape[2]
    if rep > 1:  # grouped value heads: each q/k head serves `rep` consecutive value heads
        q = q.repeat_interleave(rep, dim=2)
        k = k.repeat_interleave(rep, dim=2)
    q, k, v, beta, g = (x.transpose(1, 2).float() for x in (q, k, v, beta, g))  # heads first
    q = _l2norm(q) * (q.shape[-1] ** -0.5)
    k = _l2norm(k)
    state = state.float()

    t = torch.arange(q.shape[2], device=q.device)
    lower = t.view(-1, 1) >= t.view(1, -1)  # token i sees token j <= i
    strict = t.view(-1, 1) > t.view(1, -1)
    cum = g.cumsum(dim=-1)  # [B, H, T]: log of the decay from the pass start to each token
    # decay between token j and token i (j <= i); masked before exp so nothing overflows
    decay = torch.where(lower, cum.unsqueeze(-1) - cum.unsqueeze(-2),
                        torch.full_like(cum.unsqueeze(-1), float("-inf"))).exp()
    k_beta = k * beta.unsqueeze(-1)
    a = torch.where(strict, (k_beta @ k.transpose(-1, -2)) * decay, torch.zeros_like(decay))
    inverse = unit_lower_inverse(a, max_tokens)
    grow = cum.exp().unsqueeze(-1)  # decay from the pass start to token i
    u = inverse @ (v * beta.unsqueeze(-1))
    w = inverse @ (k_beta * grow)
    v_new = u - w @ state  # what the carried memory does not already predict
    out = (q * grow) @ state + ((q @ k.transpose(-1, -2)) * decay) @ v_new
    last = cum[..., -1:]  # [B, H, 1]
    new_state = state * last.exp().unsqueeze(-1) + \
        (k * (last - cum).exp().unsqueeze(-1)).transpose(-1, -2) @ v_new
    return out.transpose(1, 2).to(dtype), new_state


class GatedDeltaNetPass(nn.Module):
    """A transformers `*GatedDeltaNet` layer (Qwen3-Next's fused qkvz/ba projections or
    Qwen3.5's separate ones) run as one exportable pass with explicit carries."""

    def __init__(self, layer: nn.Module, max_tokens: int) -> None:
        super().__init__()
        self.layer = layer
        self.max_tokens = max_tokens
        self.act = ACT2FN[layer.activation]

    def state_shapes(self) -> tuple[list[int], list[int]]:
        m = self.layer
        return ([1, m.conv_dim, m.conv_kernel_size - 1],
                [1, m.num_v_heads, m.head_k_dim, m.head_v_dim])

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """mixed q/k/v `[B, T, conv_dim]`, z `[B, T, Hv, dv]`, b and a `[B, T, Hv]`."""
        m = self.layer
        b_, t = x.shape[:2]
        if hasattr(m, "in_proj_qkvz"):  # Qwen3-Next: projections interleaved per key head
            q, k, v, z, b, a = m.fix_query_key_value_ordering(m.in_proj_qkvz(x), m.in_proj_ba(x))
            mixed = torch.cat([y.reshape(b_, t, -1) for y in (q, k, v)], dim=-1)
            return mixed, z, b, a
        z = m.in_proj_z(x).reshape(b_, t, -1, m.head_v_dim)
        return m.in_proj_qkv(x), z, m.in_proj_b(x), m.in_proj_a(x)

    def forward(self, x: torch.Tensor, conv: torch.Tensor, rec: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.layer
        b_, t = x.shape[:2]
        mixed, z, b, a = self._project(x)
        # causal depthwise conv over [carry, this pass]: exactly T outputs, no padding
        full = torch.cat([conv, mixed.transpose(1, 2)], dim=-1)
        new_conv = full[..., full.shape[-1] - conv.shape[-1]:]
        mixed = self.act(F.conv1d(full, m.conv1d.weight, m.conv1d.bias,
                                  groups=m.conv_dim)).transpose(1, 2)
        q, k, v = torch.split(mixed, [m.key_dim, m.key_dim, m.value_dim], dim=-1)
        q = q.reshape(b_, t, -1, m.head_k_dim)
        k = k.reshape(b_, t, -1, m.head_k_dim)
        v = v.reshape(b_, t, -1, m.head_v_dim)
        beta = b.sigmoid()
        g = -m.A_log.float().exp() * F.softplus(a.float() + m.dt_bias)
        out, new_rec = gated_delta_pass(q, k, v, g, beta, rec, self.max_tokens)
        out = m.norm(out.reshape(-1, m.head_v_dim), z.reshape(-1, m.head_v_dim))
        return m.out_proj(out.reshape(b_, t, -1)), new_conv, new_rec
