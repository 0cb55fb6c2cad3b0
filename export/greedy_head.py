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


# Whisper's first timestamp comes at most this many 20 ms steps into the window (1.0 s), as in
# openai-whisper and transformers' `max_initial_timestamp_index`
MAX_INITIAL_TIMESTAMP = 50


def timestamp_rules(scores: torch.Tensor, first_scores: torch.Tensor, state: torch.Tensor,
                    timestamp_begin: int, eot: int) -> torch.Tensor:
    """Whisper's timestamp rules over `[1, T, vocab]` scores (fixed suppression already applied;
    `first_scores`: with the begin suppression too), one history per row in `state` `[1, T, 2]`:
    (kind of the last two tokens, last timestamp token or -1); kinds: 0 nothing yet, 1 last was
    text, 2 a timestamp after text, 3 two timestamps (or a lone opening one).

    The rules of transformers' WhisperTimeStampLogitsProcessor: timestamps come in pairs (after
    an opening one, text; after a closing one, a timestamp or the end), never go backwards (a
    closed pair's end may repeat as the next start), the first is a timestamp of at most 1.0 s,
    and when the timestamps' total probability beats every single text token, a timestamp wins.
    Only the 1501-entry timestamp range gets an index tensor, never the vocabulary."""
    tb = timestamp_begin
    kind, last = state[..., 0:1], state[..., 1:2]
    first = kind == 0
    scores = torch.where(first, first_scores, scores)
    below_eot, specials, stamps = scores[..., :eot], scores[..., eot:tb], scores[..., tb:]
    below_eot = below_eot.masked_fill(first | (kind == 2), NEG)
    specials = specials.masked_fill(first, NEG)
    index = torch.arange(stamps.shape[-1], device=scores.device).view(1, 1, -1)
    floor = torch.where(last < 0, torch.zeros_like(last),
                        torch.where(kind == 2, last - tb, last - tb + 1))
    off = (index < floor) | (kind == 3) | (first & (index > MAX_INITIAL_TIMESTAMP))
    stamps = stamps.masked_fill(off, NEG)
    text = torch.cat([below_eot, specials], -1)
    logp = torch.log_softmax(torch.cat([text, stamps], -1), -1)
    mass = torch.logsumexp(logp[..., tb:], -1, keepdim=True)
    text = text.masked_fill(mass > logp[..., :tb].amax(-1, keepdim=True), NEG)
    return torch.cat([text, stamps], -1)
