"""The greedy head a decoder graph can end with (issue 8): the chosen id and its log-probability
under fixed suppression rules, so a device step sends a few bytes to the host, not the logits."""

from __future__ import annotations

import torch


def greedy_choices(logits: torch.Tensor, masks: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy head: for every token row and every rule set (`masks` [R, vocab], True =
    suppressed) the chosen id `[1, T, R]` (int64; the first of equal maxima, as numpy's argmax)
    and its log-probability under the rules `[1, T, R]`, so a step returns a few bytes instead
    of the logits. All-suppressed rows give a non-finite log-probability: the runtime then
    falls back to the logits."""
    scores = torch.where(masks.unsqueeze(0).unsqueeze(0), float("-inf"), logits.unsqueeze(2))
    choice = scores.argmax(-1)
    logp = torch.log_softmax(scores, -1).gather(-1, choice.unsqueeze(-1)).squeeze(-1)
    return choice, logp
