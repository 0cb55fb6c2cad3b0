"""The greedy head a decoder graph can end with (issue 8): the chosen id and its log-probability
under fixed suppression rules, so a device step sends a few bytes to the host, not the logits.

Rules are applied by filling -inf at small index lists and a static tail, never through a
vocabulary-sized mask or index constant: the file keeps one vocabulary-sized tensor (the tied
embedding), and the graph needs no 51864-entry iota."""

from __future__ import annotations

from typing import Sequence

import torch

NEG = float("-inf")


def suppressed(logits: torch.Tensor, ids: Sequence[int], tail_from: int | None = None
               ) -> torch.Tensor:
    """`logits` with -inf at `ids` and at every index from `tail_from` on."""
    out = logits
    if ids:
        index = torch.tensor(sorted(set(int(i) for i in ids)), dtype=torch.long)
        out = out.index_fill(-1, index.to(logits.device), NEG)
    vocab = logits.shape[-1]
    if tail_from is not None and 0 <= tail_from < vocab:
        out = torch.cat([out[..., :tail_from], torch.full_like(out[..., tail_from:], NEG)], -1)
    return out


def greedy_choices(scores: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy head over R rule sets (`scores`: R tensors `[1, T, vocab]`, suppressed tokens
    at -inf): the chosen id `[1, T, R]` (int64; the first of equal maxima, as numpy's argmax) and
    its log-probability under the rules `[1, T, R]`. An all-suppressed row gives a non-finite
    log-probability: the runtime then falls back to the logits."""
    stacked = torch.stack(list(scores), dim=2)
    choice = stacked.argmax(-1)
    logp = torch.log_softmax(stacked, -1).gather(-1, choice.unsqueeze(-1)).squeeze(-1)
    return choice, logp
