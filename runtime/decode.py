"""Greedy decoding over a one-token step graph and an optional K-token block graph.

The block graph teacher-forces a known prefix (prompt, committed tokens) in ceil(n/K) passes and
re-scores a `hint` (the previous hypothesis of the same line) in the same passes: hint tokens are
kept while each equals the greedy choice at its position, and single steps continue from the first
disagreement. The result is exactly the plain greedy sequence; only the work differs (one block
pass costs about two steps, DESIGN.md section 8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np


class DecoderGraphs(Protocol):
    """What an engine offers the decoder: a step, maybe a block of `block_size` tokens."""

    block_size: int

    def step(self, token: int, position: int) -> np.ndarray: ...

    def block(self, tokens: Sequence[int], position: int) -> np.ndarray: ...


# choose(logits, generated so far) -> token id (the caller applies its suppression rules)
Chooser = Callable[[np.ndarray, list[int]], int]


@dataclass(frozen=True)
class GreedyResult:
    tokens: tuple[int, ...]
    ended: bool  # the end token was chosen (not a limit or the loop guard)
    logits: tuple[np.ndarray, ...] = ()


def greedy_decode(graphs: DecoderGraphs, prefix: Sequence[int], choose: Chooser, eos: int,
                  limit: int, stop: Callable[[list[int]], bool], hint: Sequence[int] = (),
                  keep_logits: bool = False) -> GreedyResult:
    """Greedy tokens after `prefix` (fed, not chosen), the whole sequence at most `limit` long;
    `stop(generated)` is the loop guard."""
    prefix = list(prefix)
    generated: list[int] = []
    kept: list[np.ndarray] = []

    def take(logits: np.ndarray) -> str:
        """Choose the next token: 'eos', 'limit' (length or loop guard) or 'more'."""
        if keep_logits:
            kept.append(logits)
        token = choose(logits, generated)
        if token == eos:
            return "eos"
        generated.append(token)
        return "limit" if len(prefix) + len(generated) >= limit or stop(generated) else "more"

    def steps() -> GreedyResult:
        while True:
            status = take(graphs.step(generated[-1], len(prefix) + len(generated) - 1))
            if status != "more":
                return GreedyResult(tuple(generated), status == "eos", tuple(kept))

    k = graphs.block_size
    # without a block graph a hint cannot be checked cheaply: plain greedy from the prefix
    seq = prefix + (list(hint)[: max(0, limit - len(prefix) - 1)] if k > 1 else [])
    if k > 1 and len(seq) > 1:
        for fed in range(0, len(seq), k):
            chunk = seq[fed: fed + k]
            logits = graphs.block(chunk + [eos] * (k - len(chunk)), fed)
            for j in range(len(chunk)):
                pos = fed + j
                if pos < len(prefix) - 1:
                    continue  # inside the prefix: nothing to choose yet
                status = take(logits[j])
                if status != "more":
                    return GreedyResult(tuple(generated), status == "eos", tuple(kept))
                if pos + 1 >= len(seq) or generated[-1] != seq[pos + 1]:
                    # the hint ends or disagrees here; rows written past this point are masked
                    # (they lie at or after the next position) and get overwritten by steps
                    return steps()
    for pos, token in enumerate(seq[:-1]):
        graphs.step(token, pos)
    status = take(graphs.step(seq[-1], len(seq) - 1))
    if status != "more":
        return GreedyResult(tuple(generated), status == "eos", tuple(kept))
    return steps()
