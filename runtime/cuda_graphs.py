"""When a step graph may be replayed as a CUDA graph, and which stream gets to.

A captured CUDA graph replays fixed device addresses, so it belongs to one stream's bound
buffers (runtime/device_state.py): the device profile's `memory.cuda_graph_streams` says how many
streams of a model get captured graphs; the others run the same sessions uncaptured
(`gpu_graph_id = -1`). Each captured stream uses one `gpu_graph_id` per (graph, run size,
ping-pong parity), so one id always sees the same shapes and addresses (onnxruntime does not
check that on replay: a mismatch would give wrong numbers silently).

Capture is impossible when any node runs outside the CUDA provider (onnxruntime then inserts
Memcpy nodes; CPU-placed int64 shape arithmetic is the usual culprit), or when the graph has
control flow (If, Loop, Scan). `capture_blockers` names those nodes from onnxruntime's own
partitioning (`session.record_ep_graph_assignment_info`), so the log line says what to fix.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

log = logging.getLogger(__name__)

CUDA_EP = "CUDAExecutionProvider"
CONTROL_FLOW = ("If", "Loop", "Scan")


@dataclass(frozen=True)
class Blocker:
    """A node that prevents capture, and why."""

    node: str
    op_type: str
    provider: str
    why: str


@dataclass(frozen=True)
class CaptureDecision:
    graph: str
    capture: bool
    reason: str
    blockers: tuple[Blocker, ...] = ()

    def log_line(self) -> str:
        if self.capture:
            return f"graph {self.graph}: captured as a CUDA graph ({self.reason})"
        shown = "; ".join(f"{b.node} ({b.op_type} on {b.provider}: {b.why})"
                          for b in self.blockers[:5])
        more = f" and {len(self.blockers) - 5} more" if len(self.blockers) > 5 else ""
        return (f"graph {self.graph}: not captured as a CUDA graph: {self.reason}"
                + (f"; blocking nodes: {shown}{more}" if shown else ""))


def capture_blockers(nodes: Iterable[tuple[str, str, str]], device_ep: str = CUDA_EP
                     ) -> list[Blocker]:
    """The nodes of a partitioned graph ((provider, node name, op type) each) that prevent
    capture on `device_ep`."""
    out = []
    for provider, name, op in nodes:
        if op.startswith("Memcpy"):
            out.append(Blocker(name, op, provider, "a host/device copy inside the step"))
        elif op in CONTROL_FLOW:
            out.append(Blocker(name, op, provider, "control flow cannot be captured"))
        elif provider != device_ep:
            why = ("CPU-placed (int64 shape arithmetic is the usual case: keep it on the device "
                   "or feed it as a bound input)" if provider == "CPUExecutionProvider"
                   else f"placed on {provider}")
            out.append(Blocker(name, op, provider, why))
    return out


def decide(graph: str, provider: str, execution: str, captured_streams: int,
           nodes: Sequence[tuple[str, str, str]]) -> CaptureDecision:
    """Whether `graph` can be replayed as a CUDA graph on this configuration."""
    if provider != CUDA_EP:
        return CaptureDecision(graph, False, f"the session runs on {provider}, not CUDA")
    if execution == "host":
        return CaptureDecision(graph, False, "execution='host' feeds numpy arrays; capture "
                               "needs bound device state (execution='bound' or 'auto')")
    if captured_streams <= 0:
        return CaptureDecision(graph, False, "the device profile gives no stream a captured "
                               "graph (memory.cuda_graph_streams = 0)")
    blockers = capture_blockers(nodes)
    if blockers:
        return CaptureDecision(graph, False, f"{len(blockers)} node(s) are not capturable",
                               tuple(blockers))
    return CaptureDecision(graph, True, f"{len(nodes)} nodes on CUDA, no copies; for up to "
                           f"{captured_streams} stream(s)")


class CaptureSlots:
    """Per model: which streams get captured graphs (the first `limit` that ask), and a unique
    `gpu_graph_id` per (stream, graph, size, parity)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._taken = 0
        self._ids = itertools.count(1)

    def claim(self) -> bool:
        with self._lock:
            if self._taken >= self.limit:
                return False
            self._taken += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._taken = max(0, self._taken - 1)

    def next_id(self) -> int:
        with self._lock:
            return next(self._ids)


def run_options(graph_id: int) -> Any:
    """onnxruntime run options selecting captured graph `graph_id` (-1: run uncaptured)."""
    import onnxruntime as ort

    ro = ort.RunOptions()
    ro.add_run_config_entry("gpu_graph_id", str(graph_id))
    return ro
