"""Compacting KV for `gqa_inplace` bundles (export/lm/gqa.py): GroupQueryAttention writes each
pass's rows into the bound buffer itself, at slot `fill` onwards, and attends slots
`[0, fill + T)`, so rows must sit in position order. Instead of a wrapping ring the buffer is
compacted when a pass would run past its end: the sink rows (positions below `pinned`, the
system prompt) stay at slots 0..pinned-1, the rows still needed (the window and the rollback
`margin`) move down behind them, older ones are evicted. Keys are cached RoPE-rotated by
absolute position, so moving a row changes nothing about it.

Visibility is the ring's (runtime/responder/ring.py): a query at q sees a cached row at k when
k < pinned or k > q - window, enforced through `attention_bias [1, 1, T, fill + T]` (the pass's
own rows are causal inside the kernel). `window` = ring + 1 - margin - slack, where `slack`
free slots (at least one chunk) remain after a compaction, so compaction (one move of every
buffer's kept rows) happens once every `slack` tokens of a long conversation, not every step.

The buffers hold only as many slots as the conversation has reached, rounded up to one of the
bundle's `kv_buckets`; they grow (one copy) before they are compacted. Each growth makes new
OrtValues over the new arrays, so the engine re-binds them (`dirty`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgestream.runtime.errors import OptionError
from edgestream.runtime.responder.ring import NEG, regrow_kv
from edgestream.runtime.responder.spec import LMSpec


class CompactKV:
    """One conversation's in-order KV buffers, their OrtValues and slot bookkeeping."""

    def __init__(self, spec: LMSpec, pinned: int = 0, margin: int = 0) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.spec = spec
        self.slots = spec.kv_slots
        self.buckets = spec.kv_buckets or (spec.kv_slots,)
        # free slots a compaction leaves: a chunk at least, 1/16 of the capacity for a big one
        self.slack = max(spec.chunk_tokens, self.slots // 16)
        self.buffers: dict[str, np.ndarray] = {}
        self.values: dict[str, Any] = {}  # OrtValues over `buffers` (same memory)
        self.slot_pos = np.full(self.slots, -1, np.int64)  # position per slot, ascending
        self.fill = 0  # slots [0, fill) hold rows
        self.compactions = 0
        self._allocate(self.buckets[0])
        # the bias of any pass lives in one flat array: a pass takes a contiguous prefix
        self._bias = np.zeros(spec.chunk_tokens * self.slots, np.float32)
        self.configure(pinned, margin)

    @property
    def size(self) -> int:
        """Slots the buffers hold now."""
        return self._size

    def _allocate(self, size: int) -> None:
        """Buffers of `size` slots, keeping the filled rows, and new OrtValues over them."""
        regrow_kv(self.spec, self.buffers, size, keep=self.fill)
        for name, buffer in self.buffers.items():
            self.values[name] = self._ort.OrtValue.ortvalue_from_numpy(buffer)
        self._size = size
        self.dirty = True  # the engine must bind the new OrtValues

    def bind(self, binding: Any) -> None:
        """Bind every layer's cache as both the input and the output of the graph (the
        kernel writes the new rows in place)."""
        for k, v, present_k, present_v in self.spec.kv:
            binding.bind_ortvalue_input(k, self.values[k])
            binding.bind_ortvalue_input(v, self.values[v])
            binding.bind_ortvalue_output(present_k, self.values[k])
            binding.bind_ortvalue_output(present_v, self.values[v])
        self.dirty = False

    def configure(self, pinned: int, margin: int) -> None:
        ring = self.slots - pinned
        room = ring - margin - self.slack
        if pinned < 0 or margin < 0 or room < self.spec.chunk_tokens:
            raise OptionError(
                f"{pinned} pinned tokens, a rollback margin of {margin} and {self.slack} slots "
                f"kept free for compaction leave {room} of the bundle's {self.slots} KV slots "
                f"for the conversation; at least {self.spec.chunk_tokens} are needed: use a "
                "shorter system prompt or export with more --kv-slots")
        self.pinned, self.margin = pinned, margin
        self.window = room + 1

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values()) + self.slot_pos.nbytes

    def reset(self) -> None:
        self.slot_pos[:] = -1
        self.fill = 0
        if self._size != self.buckets[0]:
            self._allocate(self.buckets[0])

    def prepare(self, start: int, size: int) -> None:
        """Make room for a pass of `size` rows starting at position `start`: grow to the
        next bucket, or at full capacity compact."""
        need = self.fill + size
        if need <= self._size:
            return
        if need > self.slots:
            self._compact(start)
        self._grow(self.fill + size)

    def reserve(self, position: int, tokens: int) -> None:
        """Grow now to hold `tokens` more rows (up to the capacity), so that the passes that
        write them do not pay for a growth (one copy of every buffer and a re-bind).
        `position` is unused here (rows sit in order from slot 0); RingKV needs it."""
        self._grow(min(self.fill + tokens, self.slots))

    def _grow(self, need: int) -> None:
        """Buffers of the smallest bucket holding `need` rows, if they are smaller now."""
        if need > self._size:
            self._allocate(next(b for b in self.buckets if b >= need))

    def _compact(self, start: int) -> None:
        """Keep the sinks and the rows a pass at `start` (and a rollback of `margin`) needs;
        move them down so they stay in position order from slot 0."""
        pos = self.slot_pos[:self.fill]
        sinks = int(np.searchsorted(pos, self.pinned))
        first = int(np.searchsorted(pos, start - (self.window - 1) - self.margin))
        if first <= sinks:
            return
        n = self.fill - first
        for buf in self.buffers.values():
            # overlapping ranges: numpy copies through a temporary when they overlap
            buf[:, :, sinks:sinks + n] = buf[:, :, first:self.fill]
        self.slot_pos[sinks:sinks + n] = pos[first:].copy()
        self.fill = sinks + n
        self.slot_pos[self.fill:] = -1
        self.compactions += 1

    def bias(self, positions: np.ndarray) -> np.ndarray:
        """Additive `attention_bias [1, 1, T, fill + T]` for a pass at `positions` (after
        `prepare`): cached rows outside the window are masked; the pass's own are free (the
        kernel is causal)."""
        t = positions.size
        total = self.fill + t
        out = self._bias[:t * total].reshape(1, 1, t, total)
        out[...] = 0.0
        sinks = int(np.searchsorted(self.slot_pos[:self.fill], self.pinned))
        if sinks < self.fill and self.slot_pos[sinks] <= positions[-1] - self.window:
            k = self.slot_pos[None, sinks:self.fill]
            q = positions[:, None]
            out[0, 0, :, sinks:self.fill] = np.where(k > q - self.window, 0.0, NEG)
        return out

    def written(self, positions: np.ndarray) -> None:
        """The kernel wrote the pass's rows at `fill` onwards; keep the real ones (padding
        rows past them are overwritten by the next pass)."""
        n = positions.size
        self.slot_pos[self.fill:self.fill + n] = positions
        self.fill += n

    def truncate(self, position: int) -> bool:
        """Forget every row at or after `position`. True when the rows a query at `position`
        attends are all still there (the rollback is exact); False when compaction has evicted
        some (rolled back further than `margin`)."""
        self.fill = int(np.searchsorted(self.slot_pos[:self.fill], position))
        self.slot_pos[self.fill:] = -1
        need = np.arange(min(self.pinned, position))
        need = np.concatenate([need, np.arange(max(self.pinned, position - self.window + 1),
                                               position)])
        return bool(np.isin(need, self.slot_pos[:self.fill]).all())
