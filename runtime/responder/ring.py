"""Ring KV with attention sinks: every attention layer's K/V live in static buffers of C slots.

Positions below `pinned` (the sinks: the system prompt) keep slots 0..pinned-1 for ever; later
positions cycle through the other R = C - pinned slots. A query at position q sees a cached row
at position k when k < q's pass start and (k < pinned or k > q - window), so a conversation longer
than the window keeps running with its system prompt in view. `window` = R + 1 - margin: the last
`margin` slots' worth of rows are kept beyond what attention needs, so rolling back up to
`margin` tokens (a discarded speculative reply, a revised word) leaves the window intact.

`slot_pos` (absolute position per slot, -1 empty) is the only bookkeeping; the additive mask the
graph takes is built from it. RoPE is applied before rows are cached, so slot order is irrelevant.
"""

from __future__ import annotations

import numpy as np

from edgestream.runtime.errors import OptionError
from edgestream.runtime.responder.spec import LMSpec

NEG = float(np.finfo(np.float32).min)


class RingKV:
    """One conversation's KV buffers and slot bookkeeping."""

    def __init__(self, spec: LMSpec, pinned: int = 0, margin: int = 0) -> None:
        self.spec = spec
        self.slots = spec.kv_slots
        self.buffers: dict[str, np.ndarray] = {}
        for k, v, _, _ in spec.kv:
            self.buffers[k] = np.zeros(spec.kv_shape, np.float32)
            self.buffers[v] = np.zeros(spec.kv_shape, np.float32)
        self.slot_pos = np.full(self.slots, -1, np.int64)
        self.configure(pinned, margin)

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

    def slot_of(self, positions: np.ndarray) -> np.ndarray:
        ring = self.slots - self.pinned
        return np.where(positions < self.pinned, positions,
                        self.pinned + (positions - self.pinned) % ring)

    def mask(self, positions: np.ndarray) -> np.ndarray:
        """Additive mask `[1, 1, T, C]` over the cached slots for a pass at `positions`."""
        k = self.slot_pos[None, :]
        q = positions[:, None]
        ok = (k >= 0) & (k < positions[0]) & ((k < self.pinned) | (k > q - self.window))
        return np.where(ok, 0.0, NEG).astype(np.float32)[None, None]

    def feeds(self) -> dict[str, np.ndarray]:
        return self.buffers

    def write(self, outputs: dict[str, np.ndarray], positions: np.ndarray) -> None:
        """Keep the rows of the `len(positions)` real tokens of a pass (padding is dropped)."""
        n = positions.size
        keep = np.arange(max(0, n - (self.slots - self.pinned)), n)  # a pass longer than the ring
        keep = np.union1d(keep, np.flatnonzero(positions < self.pinned))
        slots = self.slot_of(positions[keep])
        for k, v, nk, nv in self.spec.kv:
            self.buffers[k][:, :, slots, :] = outputs[nk][:, :, keep, :]
            self.buffers[v][:, :, slots, :] = outputs[nv][:, :, keep, :]
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
