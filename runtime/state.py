"""Streaming state buffers owned by the runtime: allocated once from the manifest's state pairs,
fed to graph inputs, updated from graph outputs (replace, or append at a position)."""

from __future__ import annotations

import numpy as np

from edgestream.runtime.manifest import Manifest, StatePair


def initial(s: StatePair) -> np.ndarray:
    """A state buffer at its initial value. Zeros come from calloc: pages the process has not
    written take no resident memory, so a buffer that a graph replaces before anything reads it
    (Whisper's cross K/V, 18 MB for tiny) costs nothing at the encoder's peak."""
    if s.init == 0:
        return np.zeros(s.shape, dtype=s.dtype)
    return np.full(s.shape, s.init, dtype=s.dtype)


class StateStore:
    """All state buffers of one stream."""

    def __init__(self, manifest: Manifest, skip: set[str] | frozenset[str] = frozenset()) -> None:
        """`skip`: graphs whose states live elsewhere (on the device: `device_state`)."""
        states = [s for s in manifest.states if s.graph not in skip and s.output_graph not in skip]
        self.pairs: dict[str, StatePair] = {s.name: s for s in states}
        self.buffers: dict[str, np.ndarray] = {s.name: initial(s) for s in states}
        self._inputs: dict[str, list[StatePair]] = {}
        self._outputs: dict[str, list[StatePair]] = {}
        for g in manifest.graphs:
            self._inputs[g.name] = [s for s in states if s.reads(g.name)]
            self._outputs[g.name] = [s for s in states if s.writes(g.name)]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    def feeds(self, graph: str) -> dict[str, np.ndarray]:
        """The state inputs of `graph`, by input name."""
        return {s.input: self.buffers[s.name] for s in self._inputs.get(graph, [])}

    def update(self, graph: str, outputs: dict[str, np.ndarray], position: int = 0) -> None:
        """Take `graph`'s state outputs: replace buffers, or write append slices at `position`.
        A graph that shares a buffer read-only (`StatePair.read_only`) leaves it alone."""
        for s in self._outputs.get(graph, []):
            out = outputs[s.output]
            if s.update == "replace":
                self.buffers[s.name] = out
            else:
                # a K-row slice (a decoder block) may overhang the buffer's end: the rows past it
                # belong to positions the model does not have, and are dropped
                buf = self.buffers[s.name]
                rows = max(0, min(out.shape[s.axis], buf.shape[s.axis] - position))
                index = [slice(None)] * out.ndim
                index[s.axis] = slice(position, position + rows)
                part = [slice(None)] * out.ndim
                part[s.axis] = slice(0, rows)
                buf[tuple(index)] = out[tuple(part)]

    def snapshot(self, graphs: set[str]) -> dict[str, np.ndarray]:
        """Copies of the `replace` states read by `graphs`: what a rollback must restore (append
        buffers need none: rows past a restored length are masked and written again)."""
        return {name: self.buffers[name].copy() for name, s in self.pairs.items()
                if s.update == "replace" and any(s.reads(g) for g in graphs)}

    def restore(self, snapshot: dict[str, np.ndarray]) -> None:
        for name, value in snapshot.items():
            self.buffers[name] = value.copy()

    def reset(self, graphs: set[str] | None = None) -> None:
        """Back to the initial values: every buffer, or those read by any of `graphs`."""
        for name, s in self.pairs.items():
            if graphs is None or any(s.reads(g) for g in graphs):
                self.buffers[name] = initial(s)
