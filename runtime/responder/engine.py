"""Stepping an LM bundle: feed tokens (one-token step, or K-token chunks, the last one padded),
greedy decoding, and rollback to an earlier position (speculation discarded, text revised).

Models with recurrent states (LFM2's conv carries) are never padded: a padding token would enter
the carry. They take chunks of exactly K and single steps for the rest, and keep a copy of the
small states at pass boundaries: rolling back restores the nearest copy at or before the target
and re-feeds the known tokens from there (KV rows are masked back, DESIGN.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgestream.runtime.errors import OptionError
from edgestream.runtime.responder.compact import CompactKV
from edgestream.runtime.responder.lm import LanguageModel
from edgestream.runtime.responder.ring import RingKV


@dataclass(frozen=True)
class Mark:
    """Where a conversation was: enough to come back to it (KV rows past it are masked)."""

    position: int


class LMEngine:
    """One conversation's state over a shared `LanguageModel`."""

    def __init__(self, lm: LanguageModel, pinned: int = 0, margin: int = 0,
                 snapshot_bytes: int | None = None) -> None:
        self.lm = lm
        # bytes of recurrent-state snapshots kept for rollback (see `_save`)
        self.snapshot_bytes = self.SAVED_BYTES if snapshot_bytes is None else snapshot_bytes
        if self.snapshot_bytes < 0:
            raise OptionError(f"snapshot budget {snapshot_bytes} bytes is negative; give 0 "
                              "(rollback re-reads the conversation) or more")
        self.spec = lm.spec
        self.inplace = lm.spec.kv_layout == "gqa_inplace"
        self.kv: RingKV | CompactKV = (CompactKV if self.inplace else RingKV)(lm.spec, pinned,
                                                                               margin)
        if self.inplace:
            self._bound = _BoundPass(lm, self.kv)
        self.tokens: list[int] = []  # every token fed, by position
        self.passes = {"step": 0, "chunk": 0}
        self.recurrent = {name: np.zeros(shape, np.float32)
                          for name, _, shape in self.spec.recurrent}
        self._saved: dict[int, dict[str, np.ndarray]] = {}  # position -> recurrent states
        self.last_logits = np.zeros(lm.spec.vocab, np.float32)  # of the last token fed

    @property
    def position(self) -> int:
        return len(self.tokens)

    @property
    def state_bytes(self) -> int:
        return self.kv.nbytes + sum(b.nbytes for b in self.recurrent.values())

    def reset(self) -> None:
        self.kv.reset()
        self.tokens = []
        for b in self.recurrent.values():
            b[...] = 0.0
        self._saved = {}

    def _pass(self, tokens: list[int], size: int) -> np.ndarray:
        n = len(tokens)
        start = self.position
        if start + size > self.spec.max_position:
            raise OptionError(f"position {start + size} is past the model's "
                              f"{self.spec.max_position} positions; start a new conversation")
        if self.inplace:
            logits = self._bound.run(tokens, start, size)
            self.tokens += tokens
            self.passes["step" if size == 1 else "chunk"] += 1
            return logits
        positions = np.arange(start, start + n, dtype=np.int64)
        padded = np.arange(start, start + size, dtype=np.int64)
        if self.recurrent:
            self._save()
        feeds = dict(self.kv.feeds())
        feeds.update(self.recurrent)
        feeds["input_ids"] = np.array([tokens + [self.spec.pad] * (size - n)], np.int64)
        feeds["position_ids"] = padded[None]
        feeds["attention_mask"] = self.kv.mask(padded)
        out = self.lm.session.run(feeds)
        self.kv.write(out, positions)
        for name, output, _ in self.spec.recurrent:
            self.recurrent[name] = out[output]
        self.tokens += tokens
        self.passes["step" if size == 1 else "chunk"] += 1
        return out["logits"][0, :n]

    def feed(self, tokens: list[int], all_logits: bool = False) -> np.ndarray:
        """Feed `tokens` at the current position; returns the last token's logits `[vocab]`
        (or every token's, `[n, vocab]`). One token is a step; more go in K-token chunks."""
        if not tokens:
            raise ValueError("feed needs at least one token")
        k = self.spec.chunk_tokens
        outs = []
        if len(tokens) == 1:
            outs.append(self._pass(tokens, 1))
        elif self.recurrent:  # exact chunks, then steps: no padding enters a carry
            whole = len(tokens) // k * k
            for i in range(0, whole, k):
                outs.append(self._pass(tokens[i:i + k], k))
            for t in tokens[whole:]:
                outs.append(self._pass([t], 1))
        else:
            for i in range(0, len(tokens), k):
                part = tokens[i:i + k]
                outs.append(self._pass(part, 1 if len(part) == 1 else k))
        logits = outs[0] if len(outs) == 1 else np.concatenate(outs)
        self.last_logits = logits[-1]
        return logits if all_logits else logits[-1]

    def reserve(self, tokens: int) -> None:
        """Make the KV buffers hold `tokens` more positions now (they grow in buckets, one copy
        each time): called while the person is still talking, a reply's steps never wait for
        a growth."""
        self.kv.reserve(self.position, tokens)
        if self.inplace and self.kv.dirty:
            self.kv.bind(self._bound.io)

    def mark(self) -> Mark:
        return Mark(self.position)

    def rollback(self, mark: Mark | int) -> bool:
        """Back to `mark` (a position); True when exact (see `RingKV.truncate`)."""
        position = mark.position if isinstance(mark, Mark) else mark
        if position > self.position:
            raise ValueError(f"cannot roll forward from {self.position} to {position}")
        if self.recurrent:
            return self._rollback_recurrent(position)
        del self.tokens[position:]
        self.last_logits = np.zeros_like(self.last_logits)  # unknown until a token is fed
        return self.kv.truncate(position)

    SAVED = 64  # pass boundaries whose recurrent states are kept
    SAVED_BYTES = 256 << 20  # default byte budget of them (a real DeltaNet snapshot is ~60 MB)

    @property
    def snapshots_kept(self) -> int:
        """How many snapshots the byte budget allows (at most SAVED; 0 when one is larger
        than the budget)."""
        size = max(1, sum(b.nbytes for b in self.recurrent.values()))
        return min(self.SAVED, self.snapshot_bytes // size)

    def _save(self) -> None:
        """Snapshot the recurrent states at this pass boundary, within the byte budget.
        Position 0 is never stored: its state is all zeros. Fallback when the budget keeps
        few or none: a rollback restores the nearest kept snapshot at or before the target (or
        the zero state at position 0) and re-reads the known tokens from there, so a smaller
        budget costs re-prefill time, never correctness."""
        keep = self.snapshots_kept
        if keep <= 0 or self.position == 0:
            return
        self._saved[self.position] = {n: b.copy() for n, b in self.recurrent.items()}
        if len(self._saved) > keep:
            # thin out rather than forget the oldest (a rollback past it would re-read from
            # 0, e.g. a discarded speculative reply of more passes than SAVED): drop the
            # boundary whose removal leaves the smallest gap relative to its age, so the
            # spacing grows with age and the re-feed after a rollback stays short for recent
            # positions
            p = sorted(self._saved)
            if len(p) < 3:
                del self._saved[p[0]]
                return
            now = self.position + 1
            score = [(p[i + 1] - p[i - 1]) / (now - p[i]) for i in range(1, len(p) - 1)]
            del self._saved[p[1 + int(np.argmin(score))]]

    def _rollback_recurrent(self, position: int) -> bool:
        back = [p for p in self._saved if p <= position]
        base = max(back, default=0)
        replay = self.tokens[base:position]
        for p in [p for p in self._saved if p > base]:
            del self._saved[p]
        if base in self._saved:
            for name, value in self._saved.pop(base).items():
                self.recurrent[name] = value
        else:  # the start of the conversation: states are zeros there
            self.recurrent = {n: np.zeros_like(b) for n, b in self.recurrent.items()}
        del self.tokens[base:]
        exact = self.kv.truncate(base)
        self.last_logits = np.zeros_like(self.last_logits)
        if replay:
            self.feed(replay)
        return exact

    def greedy(self, logits: np.ndarray, max_new: int) -> list[int]:
        """Greedy continuation from `logits` (of the last fed token): at most `max_new` tokens,
        ending at a stop token (not included; not fed)."""
        out: list[int] = []
        for _ in range(max_new):
            token = int(np.argmax(logits))
            if token in self.spec.stop:
                break
            out.append(token)
            if len(out) < max_new:
                logits = self.feed([token])
        return out


class _BoundPass:
    """One pass of a `gqa_inplace` graph through a reused IO binding: the caches are bound as
    input and output (written in place), ids, positions, lengths and logits live in arrays
    made once per pass size, so a decode step allocates nothing but the bias view."""

    def __init__(self, lm: LanguageModel, kv: CompactKV) -> None:
        import onnxruntime as ort

        self.lm, self.kv = lm, kv
        self.io = lm.session.session.io_binding()
        self.seqlens = np.zeros(1, np.int32)
        self.total = np.zeros((), np.int32)
        self.arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        self.values: dict[int, tuple] = {}
        for size in {1, lm.spec.chunk_tokens}:
            ids = np.zeros((1, size), np.int64)
            pos = np.zeros((1, size), np.int64)
            logits = np.zeros((1, size, lm.spec.vocab), np.float32)
            self.arrays[size] = (ids, pos, logits, np.arange(size, dtype=np.int64)[None])
            self.values[size] = tuple(ort.OrtValue.ortvalue_from_numpy(a)
                                      for a in (ids, pos, logits))
        self._size = 0  # the pass size whose arrays are bound
        self._lengths = (ort.OrtValue.ortvalue_from_numpy(self.seqlens),
                         ort.OrtValue.ortvalue_from_numpy(self.total))
        self.io.bind_ortvalue_input("seqlens_k", self._lengths[0])
        self.io.bind_ortvalue_input("total_sequence_length", self._lengths[1])

    def run(self, tokens: list[int], start: int, size: int) -> np.ndarray:
        kv, io = self.kv, self.io
        kv.prepare(start, size)
        if kv.dirty:
            kv.bind(io)
        ids, pos, logits, steps = self.arrays[size]
        if size != self._size:
            ids_v, pos_v, logits_v = self.values[size]
            io.bind_ortvalue_input("input_ids", ids_v)
            io.bind_ortvalue_input("position_ids", pos_v)
            io.bind_ortvalue_output("logits", logits_v)
            self._size = size
        n = len(tokens)
        ids[0, :n] = tokens
        ids[0, n:] = self.lm.spec.pad
        np.add(steps, start, out=pos)
        self.seqlens[0] = kv.fill + size - 1  # GQA writes at seqlens + 1 - size = fill
        self.total[()] = kv.fill + size
        io.bind_cpu_input("attention_bias", kv.bias(pos[0]))
        self.lm.session.run_bound(io, size)
        kv.written(pos[0, :n])
        return logits[0, :n].copy()  # the array is the next pass's output
