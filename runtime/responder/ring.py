"""Ring KV with attention sinks: every attention layer's K/V live in static buffers of C slots.

Positions below `pinned` (the sinks: the system prompt) keep slots 0..pinned-1 for ever; later
positions cycle through the other R = C - pinned slots. A query at position q sees a cached row
at position k when k < q's pass start and (k < pinned or k > q - window), so a conversation longer
than the window keeps running with its system prompt in view. `window` = R + 1 - margin: the last
`margin` slots' worth of rows are kept beyond what attention needs, so rolling back up to
`margin` tokens (a discarded speculative reply, a revised word) leaves the window intact.

`slot_pos` (absolute position per slot, -1 empty) is the only bookkeeping; the additive mask the
graph takes is built from it. RoPE is applied before rows are cached, so slot order is irrelevant.

The buffers hold only as many slots as the conversation has reached, rounded up to one of the
bundle's `kv_buckets` (the graph's slot axis is symbolic): slots fill in order until the ring
wraps, so an early turn attends over 64 or 128 slots instead of the full capacity, and the
buffers grow (one copy) when a write needs a slot past their size.
"""

from __future__ import annotations

import numpy as np

from edgestream.runtime.errors import OptionError
from edgestream.runtime.responder.spec import LMSpec

NEG = float(np.finfo(np.float32).min)


def regrow_kv(spec: LMSpec, buffers: dict[str, np.ndarray], size: int, keep: int) -> None:
    """Replace every layer's K/V buffer in `buffers` by one of `size` slots, copying the first
    `keep` slots' rows of the old one (the new slots are zero). Shared by both KV layouts."""
    shape = list(spec.kv_shape)
    shape[2] = size
    for k, v, _, _ in spec.kv:
        for name in (k, v):
            new = np.zeros(shape, np.float32)
            old = buffers.get(name)
            if old is not None:
                n = min(size, old.shape[2], keep)
                new[:, :, :n] = old[:, :, :n]
            buffers[name] = new


class RingKV:
    """One conversation's KV buffers and slot bookkeeping."""

    def __init__(self, spec: LMSpec, pinned: int = 0, margin: int = 0) -> None:
        self.spec = spec
        self.slots = spec.kv_slots
        self.buckets = spec.kv_buckets or (spec.kv_slots,)
        self.buffers: dict[str, np.ndarray] = {}
        self._allocate(self.buckets[0])
        self.slot_pos = np.full(self.slots, -1, np.int64)
        self.configure(pinned, margin)

    @property
    def size(self) -> int:
        """Slots the buffers hold now (the size of the graph's slot axis for the next pass)."""
        return self._size

    def _allocate(self, size: int) -> None:
        regrow_kv(self.spec, self.buffers, size, keep=size)
        self._size = size

    def _fit(self, last_slot: int) -> None:
        if last_slot >= self._size:
            self._allocate(next(b for b in self.buckets if b > last_slot))

    def reserve(self, position: int, tokens: int) -> None:
        """Grow now to hold positions up to `position + tokens` (slots fill in position order
        until the ring wraps), so the passes that write them do not pay for a growth."""
        self._fit(min(position + tokens, self.slots) - 1)

    def configure(self, pinned: int, margin: int) -> None:
        ring = self.slots - pinned
        if pinned < 0 or margin < 0 or ring - margin < self.spec.chunk_tokens:
            raise OptionError(
                f"{pinned} pinned tokens and a rollback margin of {margin} leave "
                f"{ring - margin} of the bundle's {self.slots} KV slots for the conversation; "
                f"at least {self.spec.chunk_tokens} are needed: use a shorter system prompt or "
                "export with more --kv-slots")
        self.pinned, self.margin = pinned, margin
        self.window = ring + 1 - margin

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values()) + self.slot_pos.nbytes

    def reset(self) -> None:
        self.slot_pos[:] = -1  # rows of empty slots are masked; no need to clear them
        if self._size != self.buckets[0]:
            self._allocate(self.buckets[0])

    def slot_of(self, positions: np.ndarray) -> np.ndarray:
        ring = self.slots - self.pinned
        return np.where(positions < self.pinned, positions,
                        self.pinned + (positions - self.pinned) % ring)

    def mask(self, positions: np.ndarray) -> np.ndarray:
        """Additive mask `[1, 1, T, C]` over the cached slots for a pass at `positions`."""
        k = self.slot_pos[None, :self._size]
        q = positions[:, None]
        ok = (k >= 0) & (k < positions[0]) & ((k < self.pinned) | (k > q - self.window))
        return np.where(ok, 0.0, NEG).astype(np.float32)[None, None]

    def feeds(self) -> dict[str, np.ndarray]:
        return self.buffers

    def write(self, outputs: dict[str, np.ndarray], positions: np.ndarray) -> None:
        """Keep the rows of the `len(positions)` real tokens of a pass (padding is dropped)."""
        n = positions.size
        first = int(positions[0])
        s0 = self.pinned + (first - self.pinned) % (self.slots - self.pinned)
        consecutive = int(positions[-1]) - first == n - 1
        if first >= self.pinned and s0 + n <= self.slots and consecutive:
            # the common case (every step, chunks that do not wrap): consecutive positions to
            # consecutive slots, no index arithmetic (this runs once per decoded token)
            self._fit(s0 + n - 1)
            at = slice(s0, s0 + n)
            for k, v, nk, nv in self.spec.kv:
                self.buffers[k][0, :, at] = outputs[nk][0, :, :n]
                self.buffers[v][0, :, at] = outputs[nv][0, :, :n]
            self.slot_pos[at] = positions
            return
        keep = np.arange(max(0, n - (self.slots - self.pinned)), n)  # a pass longer than the ring
        keep = np.union1d(keep, np.flatnonzero(positions < self.pinned))
        slots = self.slot_of(positions[keep])
        self._fit(int(slots.max()))
        # consecutive slots from consecutive rows (every step, and chunks that do not wrap):
        # plain slices, no index arrays
        if slots[-1] - slots[0] == keep[-1] - keep[0] == keep.size - 1:
            at, rows = slice(int(slots[0]), int(slots[-1]) + 1), slice(int(keep[0]),
                                                                        int(keep[-1]) + 1)
        else:
            at, rows = slots, keep
        for k, v, nk, nv in self.spec.kv:
            self.buffers[k][:, :, at, :] = outputs[nk][:, :, rows, :]
            self.buffers[v][:, :, at, :] = outputs[nv][:, :, rows, :]
        self.slot_pos[slots] = positions[keep]

    def truncate(self, position: int) -> bool:
        """Forget every row at or after `position`. True when the rows a query at `position`
        attends are all still there (the rollback is exact); False when the ring has overwritten
        some (rolled back further than `margin`)."""
        self.slot_pos[self.slot_pos >= position] = -1
        need = np.arange(min(self.pinned, position))
        need = np.concatenate([need, np.arange(max(self.pinned, position - self.window + 1),
                                               position)])
        return bool(np.isin(need, self.slot_pos).all())
