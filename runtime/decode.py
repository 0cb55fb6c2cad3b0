"""Greedy (or seeded sampled) decoding over a one-token step graph and an optional K-token block.

The block graph teacher-forces a known prefix (prompt, context, committed tokens) in ceil(n/K)
passes and re-scores a `hint` (the previous hypothesis of the same line) in the same passes: hint
tokens are kept while each equals the choice at its position, and single steps continue from the
first disagreement. The result is exactly the plain step-by-step sequence; only the work differs
(one block pass costs about two steps, DESIGN.md section 8).

Where the decoder graph ends with a greedy head (issue 8), steps and block rows alike are read as
the head's (id, log-probability), not as logits; the logits are read only where a row needs them
(a probe, a row the head cannot decide); `keep_logits` and sampling bypass the head.

Every chosen token carries its log-probability (after the family's suppression rules), so callers
can judge a decode the way the best Whisper runtimes do: average log-probability, compression
ratio, the probability of "no speech" at a probe position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np

from edgestream.runtime.heartbeat import beat

if TYPE_CHECKING:
    from edgestream.runtime.bundle import Bundle


class DecoderGraphs(Protocol):
    """What an engine offers the decoder: a step, maybe a block of `block_size` tokens."""

    block_size: int

    def step(self, token: int, position: int) -> np.ndarray: ...

    def block(self, tokens: Sequence[int], position: int) -> np.ndarray: ...


def block_graph(bundle: "Bundle", token_input: str) -> tuple[str, int]:
    """(graph, K) of a bundle's K-token decoder pass: the decoder itself when its token axis is
    symbolic (run at 1 and K: one graph, the weights stored once), or a separate
    `decoder_block` graph of bundles written before that; K = 1 when there is none."""
    legacy = bundle.manifest.graph("decoder_block") if "decoder_block" in bundle.sessions else None
    if legacy is not None:
        size = legacy.input(token_input).shape[1]
        return "decoder_block", int(size) if isinstance(size, int) else 1
    return "decoder", max(bundle.manifest.graph("decoder").dims.get("tokens", (1,)))


# choose(logits, generated so far) -> (token id, its log-probability); the engine applies its
# suppression rules and, for fallback decodes, samples at a temperature
Chooser = Callable[[np.ndarray, list[int]], "tuple[int, float]"]
# stop(generated) -> True when the loop guard wants this decode to end here
Stopper = Callable[[list[int]], bool]
# head(token, position, generated) -> the step's greedy choice (id, log-probability) from the
# graph's greedy head, or its logits when the head cannot decide (every token suppressed)
Head = Callable[[int, int, list[int]], "tuple[int, float] | np.ndarray"]


class BlockRows(Protocol):
    """One K-token block pass, read row by row: the graph head's choice where it can decide,
    the row's logits where they are needed (a probe, a row the head cannot decide)."""

    def choice(self, row: int, generated: list[int]) -> "tuple[int, float] | None": ...

    def logits(self, row: int) -> np.ndarray: ...


# block_head(tokens, position, histories) -> the pass's rows; histories[j] is what `generated`
# is when row j's choice is taken if the hint holds (None: a row inside the prefix, no choice)
BlockHead = Callable[[Sequence[int], int, Sequence["list[int] | None"]], BlockRows]


@dataclass(frozen=True)
class LogitRows:
    """A block pass read through its logits only (no head: older bundles, sampling, parity)."""

    all_logits: np.ndarray

    def choice(self, row: int, generated: list[int]) -> None:
        return None

    def logits(self, row: int) -> np.ndarray:
        return self.all_logits[row]


class HeadRows:
    """A block pass read through the graph's greedy head: row j's choice is column
    `column(j, generated)` of its `choice` / `choice_logprob` outputs (None, or a non-finite
    log-probability: every token suppressed, the host's rules decide through the logits). The
    choices are copied to the host once, on first use; the logits only row by row, where a row
    needs them."""

    def __init__(self, outputs: Any, column: Callable[[int, list[int]], "int | None"]) -> None:
        self.outputs = outputs  # a step's outputs: `host(name)` copies one to the host
        self.column = column
        self._fetched: dict[str, np.ndarray] = {}

    def _host(self, name: str) -> np.ndarray:
        if name not in self._fetched:
            self._fetched[name] = self.outputs.host(name)[0]
        return self._fetched[name]

    def choice(self, row: int, generated: list[int]) -> tuple[int, float] | None:
        col = self.column(row, generated)
        if col is None:
            return None
        logp = float(self._host("choice_logprob")[row, col])
        return (int(self._host("choice")[row, col]), logp) if np.isfinite(logp) else None

    def logits(self, row: int) -> np.ndarray:
        return self.outputs.host_row("logits", row)


@dataclass(frozen=True)
class GreedyResult:
    tokens: tuple[int, ...]
    ended: bool  # the end token was chosen (not a limit or the loop guard)
    logprobs: tuple[float, ...] = ()  # of every choice, the end token's included
    probe: np.ndarray | None = None  # logits at the probe position, when one was asked for
    looped: bool = False  # the loop guard ended this decode
    logits: tuple[np.ndarray, ...] = ()  # every choice's logits, when kept (parity checks)
    # index in `tokens` of the segment whose close a loop guard forced (the decode may have gone
    # on after it); None when no guard overrode a choice
    guarded_at: int | None = None

    @property
    def guarded(self) -> bool:
        return self.guarded_at is not None

    @property
    def avg_logprob(self) -> float:
        return float(np.mean(self.logprobs)) if self.logprobs else 0.0


def log_softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max()
    return shifted - np.log(np.exp(shifted).sum())


def pick(scores: np.ndarray, temperature: float, rng: np.random.Generator | None
         ) -> tuple[int, float]:
    """Argmax (temperature 0) or a seeded sample; returns the token and its log-probability."""
    logp = log_softmax(scores.astype(np.float64))
    if temperature <= 0.0 or rng is None:
        token = int(np.argmax(scores))
    else:
        p = np.exp(log_softmax(scores.astype(np.float64) / temperature))
        token = int(rng.choice(p.size, p=p / p.sum()))
    return token, float(logp[token])


def greedy_decode(graphs: DecoderGraphs, prefix: Sequence[int], choose: Chooser, eos: int,
                  limit: int, stop: Stopper, hint: Sequence[int] = (),
                  probe: int | None = None, keep_logits: bool = False,
                  head: Head | None = None, block_head: BlockHead | None = None
                  ) -> GreedyResult:
    """Tokens after `prefix` (fed, not chosen), the whole sequence at most `limit` long.
    `stop(generated)` is the loop guard; `probe`: keep the logits at that prefix position.
    `head`: single steps take the graph's own greedy choice (only the id and its
    log-probability leave the device); `block_head`: the same for block passes. Both must
    apply the same rules as `choose`; `keep_logits` (parity checks) bypasses them."""
    if keep_logits:
        head = block_head = None
    prefix = list(prefix)
    generated: list[int] = []
    logprobs: list[float] = []
    probed: list[np.ndarray] = []
    kept: list[np.ndarray] = []

    def result(status: str) -> GreedyResult:
        return GreedyResult(tuple(generated), status == "eos", tuple(logprobs),
                            probed[0] if probed else None, status == "loop", tuple(kept))

    def take(logits: np.ndarray | tuple[int, float]) -> str:
        """Choose the next token (or take the head's choice): 'eos', 'limit', 'loop' or
        'more'."""
        beat()  # a long decode is progress, not a stall
        if isinstance(logits, tuple):
            token, logp = logits
        else:
            if keep_logits:
                kept.append(logits)
            token, logp = choose(logits, generated)
        logprobs.append(logp)
        if token == eos:
            return "eos"
        generated.append(token)
        if stop(generated):
            return "loop"
        return "limit" if len(prefix) + len(generated) >= limit else "more"

    def look(pos: int, logits: np.ndarray) -> None:
        if pos == probe:
            probed.append(logits.copy())

    def steps() -> GreedyResult:
        while True:
            token, pos = generated[-1], len(prefix) + len(generated) - 1
            status = take(head(token, pos, generated) if head is not None
                          else graphs.step(token, pos))
            if status != "more":
                return result(status)

    k = graphs.block_size
    # without a block graph a hint cannot be checked cheaply: plain greedy from the prefix
    seq = prefix + (list(hint)[: max(0, limit - len(prefix) - 1)] if k > 1 else [])
    if k > 1 and len(seq) > 1:
        for fed in range(0, len(seq), k):
            chunk = seq[fed: fed + k]
            padded = chunk + [eos] * (k - len(chunk))
            if block_head is None:
                rows: BlockRows = LogitRows(graphs.block(padded, fed))
            else:
                rows = block_head(padded, fed, [
                    seq[len(prefix): fed + j + 1] if len(prefix) - 1 <= fed + j < len(seq)
                    else None for j in range(k)])
            for j in range(len(chunk)):
                pos = fed + j
                if pos == probe:
                    look(pos, rows.logits(j))
                if pos < len(prefix) - 1:
                    continue  # inside the prefix: nothing to choose yet
                chosen = rows.choice(j, generated)
                status = take(chosen if chosen is not None else rows.logits(j))
                if status != "more":
                    return result(status)
                if pos + 1 >= len(seq) or generated[-1] != seq[pos + 1]:
                    # the hint ends or disagrees here; rows written past this point are masked
                    # (they lie at or after the next position) and get overwritten by steps
                    return steps()
    last: np.ndarray | tuple[int, float] | None = None
    for pos, token in enumerate(seq):
        if head is None or pos == probe:
            last = graphs.step(token, pos)
            look(pos, last)
        else:  # the head's choice is used at the last prefix token only
            last = head(token, pos, generated)
    assert last is not None  # the prefix is never empty (engines check their prompt)
    status = take(last)
    if status != "more":
        return result(status)
    return steps()
