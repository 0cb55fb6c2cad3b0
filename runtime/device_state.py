"""Streaming state resident on the execution device, bound with IO binding (DESIGN.md 4.3).

Each stream's state buffers are allocated once as OrtValues on the device its sessions run on
and bound to the graphs' inputs and outputs, so a step copies nothing but what the host needs:

- `replace` states that a graph both reads and writes (conv carries, encoder histories) alternate
  between two preallocated buffers (ping-pong): the step reads one and writes the other, and the
  next step reads what was written. A state that a graph writes without reading it (Whisper's
  cross K/V, filled by the encoder) is bound as that graph's output directly: one buffer.
- `append` states (K/V caches): the graph returns only the new rows into a preallocated scratch
  output, and a strided device-to-device copy writes them into the full buffer at the position
  (`RowWriter`). Why this way: it needs no export change (old bundles work), keeps every
  address fixed (what CUDA graphs need), copies only the new rows (Whisper tiny.en: 12 KB per
  token instead of the 2.4 MB cache), and relies on no buffer aliasing inside onnxruntime. An
  in-graph write into a bound full buffer would need the graph to output the whole buffer
  (a full copy per step, or aliasing that onnxruntime does not promise).
- small inputs (token, position, lengths, audio) live in preallocated buffers updated in place.

`reset` writes the initial values in place; `snapshot`/`restore` copy `replace` states through
the host (rare: a speculative final). With the CPU provider the "device" is host memory and the
row writer is a numpy copy through views of the OrtValues; results are identical to the host
path (tests/runtime/test_device_state.py proves it on Whisper and Moonshine).
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from edgestream.runtime.cuda_graphs import run_options
from edgestream.runtime.errors import ProviderError
from edgestream.runtime.manifest import Manifest, StatePair, TensorSpec
from edgestream.runtime.session import GraphSession
from edgestream.runtime.state import StateStore

log = logging.getLogger(__name__)


def device_of(session: GraphSession) -> tuple[str, int]:
    """('cuda', id) when the session runs on CUDA or TensorRT, else ('cpu', 0)."""
    if session.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        short = "tensorrt" if session.provider.startswith("Tensorrt") else "cuda"
        return "cuda", int(session.config.provider_options.get(short, {}).get("device_id", 0))
    return "cpu", 0


class HostRowWriter:
    """Row copies in host memory, through numpy views of CPU OrtValues."""

    def __init__(self) -> None:
        self._views: dict[int, np.ndarray] = {}

    def view(self, value: Any, dtype: str, shape: Sequence[int]) -> np.ndarray:
        ptr = value.data_ptr()
        v = self._views.get(ptr)
        if v is None or v.shape != tuple(shape) or v.dtype != np.dtype(dtype):
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            raw = (ctypes.c_char * nbytes).from_address(ptr)
            v = np.frombuffer(raw, dtype=dtype).reshape(shape)
            self._views[ptr] = v
        return v

    def copy_rows(self, dst: Any, dst_shape: Sequence[int], src: Any, src_shape: Sequence[int],
                  dtype: str, axis: int, src_start: int, rows: int, dst_pos: int) -> None:
        d = self.view(dst, dtype, dst_shape)
        s = self.view(src, dtype, src_shape)
        di = [slice(None)] * len(dst_shape)
        si = [slice(None)] * len(src_shape)
        di[axis] = slice(dst_pos, dst_pos + rows)
        si[axis] = slice(src_start, src_start + rows)
        d[tuple(di)] = s[tuple(si)]

    def fill(self, dst: Any, shape: Sequence[int], dtype: str, value: float) -> None:
        self.view(dst, dtype, shape).fill(value)

    def finish(self) -> None:
        pass


class CudaRowWriter:
    """Row copies on the GPU: one `cudaMemcpy2D` per state (every leading index is a row of the
    2-D copy, the appended rows of one leading index are contiguous). Not run in CI (no GPU):
    the CPU path proves the indexing, this class only maps it onto the CUDA runtime."""

    def __init__(self, device_id: int) -> None:
        self.cudart = _load_cudart()
        self.cudart.cudaMemcpy2D.restype = ctypes.c_int
        self.device_id = device_id

    def copy_rows(self, dst: Any, dst_shape: Sequence[int], src: Any, src_shape: Sequence[int],
                  dtype: str, axis: int, src_start: int, rows: int, dst_pos: int) -> None:
        self.cudart.cudaSetDevice(ctypes.c_int(self.device_id))  # per thread: streams may move
        item = np.dtype(dtype).itemsize
        outer = int(np.prod(dst_shape[:axis]))
        inner = int(np.prod(dst_shape[axis + 1:])) * item
        err = self.cudart.cudaMemcpy2D(
            ctypes.c_void_p(dst.data_ptr() + dst_pos * inner), ctypes.c_size_t(dst_shape[axis] * inner),
            ctypes.c_void_p(src.data_ptr() + src_start * inner), ctypes.c_size_t(src_shape[axis] * inner),
            ctypes.c_size_t(rows * inner), ctypes.c_size_t(outer), ctypes.c_int(3))  # D2D
        if err:
            raise ProviderError(f"CUDA device {self.device_id}: cudaMemcpy2D failed with error "
                                f"{err} while writing K/V rows; run `edgestream doctor`")

    def fill(self, dst: Any, shape: Sequence[int], dtype: str, value: float) -> None:
        dst.update_inplace(np.full(shape, value, dtype=dtype))

    def finish(self) -> None:
        # onnxruntime's next run uses its own stream: the copies must be done before it starts
        self.cudart.cudaDeviceSynchronize()


def _load_cudart() -> Any:
    names = ["libcudart.so.12", "libcudart.so.13", "libcudart.so", "cudart64_12.dll"]
    try:  # the pip CUDA runtime that onnxruntime-gpu loads (nvidia-cuda-runtime-cu12)
        import nvidia.cuda_runtime as cr  # type: ignore[import-not-found]

        from pathlib import Path
        names = [str(p) for p in Path(cr.__path__[0]).glob("lib/libcudart.so*")] + names
    except ImportError:
        pass
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise ProviderError("bound execution on CUDA needs the CUDA runtime library (libcudart) for "
                        "device-side K/V row writes, and none was found; install the CUDA 12 "
                        "runtime (pip install nvidia-cuda-runtime-cu12) or use execution='host'")


def to_host(value: Any) -> np.ndarray:
    """A host copy of an OrtValue (a CPU OrtValue's numpy() shares the bound buffer, which the
    next step overwrites)."""
    return value.numpy().copy() if value.device_name() == "cpu" else value.numpy()


def _sized(shape: Sequence[int | str], size: int) -> tuple[int, ...]:
    return tuple(size if isinstance(d, str) else int(d) for d in shape)


@dataclass
class StepOutputs:
    """What a bound step returns: its non-state outputs, still on the device."""

    values: dict[str, Any]

    def host(self, name: str) -> np.ndarray:
        """Copy one output to the host (the only bytes that cross the bus)."""
        v = self.values[name]
        return v if isinstance(v, np.ndarray) else to_host(v)

    def host_row(self, name: str, row: int) -> np.ndarray:
        """Row `row` of a `[1, T, ...]` output on the host (a probe's logits out of a block
        pass): a CPU output copies only that row; a CUDA one is copied whole, then cut."""
        v = self.values[name]
        if isinstance(v, np.ndarray):
            return v[0, row]
        return v.numpy()[0, row].copy()

    def __getitem__(self, name: str) -> Any:
        return self.values[name]


class HostStates(StateStore):
    """The host path behind the same `run` as `BoundStates`: numpy feeds, state in host arrays."""

    execution = "host"

    def __init__(self, manifest: Manifest, sessions: Mapping[str, GraphSession]) -> None:
        super().__init__(manifest)
        self.sessions = sessions

    def run(self, graph: str, inputs: Mapping[str, Any], position: int = 0,
            rows: Sequence[int] | None = None) -> StepOutputs:
        """Run `graph` with its state; `rows`: append only these rows of the append outputs."""
        feeds = self.feeds(graph)
        feeds.update({k: (v.values if isinstance(v, StepOutputs) else v)
                      for k, v in inputs.items()})
        out = self.sessions[graph].run(feeds)
        if rows is not None:
            idx = np.asarray(rows, dtype=np.int64)
            axes = {s.output: s.axis for s in self._outputs.get(graph, ()) if s.update == "append"}
            out = {k: np.take(v, idx, axis=axes[k]) if k in axes else v for k, v in out.items()}
        self.update(graph, out, position)
        return StepOutputs(out)


class BoundStates:
    """All state of one stream resident on the execution device; see the module docstring.
    Graphs not in `graphs` (the VAD, on the CPU by design) keep host buffers in `self.host`."""

    execution = "bound"

    def __init__(self, manifest: Manifest, sessions: Mapping[str, GraphSession],
                 graphs: Iterable[str]) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.graphs = set(graphs) & set(sessions)
        self.sessions = sessions
        self.pairs: dict[str, StatePair] = {s.name: s for s in manifest.states}
        self.host = StateStore(manifest, skip=self.graphs)
        first = sessions[next(iter(sorted(self.graphs)))]
        self.device, self.device_id = device_of(first)
        self.writer: Any = HostRowWriter() if self.device == "cpu" else \
            CudaRowWriter(self.device_id)
        self.specs = {g.name: g for g in manifest.graphs}
        self._bound_pairs = [s for s in manifest.states
                             if s.graph in self.graphs or s.output_graph in self.graphs]
        # a state that a graph reads and replaces needs two buffers (ping-pong)
        self._pingpong = {s.name for s in self._bound_pairs if s.update == "replace" and any(
            s.reads(g) and s.writes(g) for g in self.graphs)}
        self.values: dict[str, list[Any]] = {}
        for s in self._bound_pairs:
            self.values[s.name] = [self._alloc(s.shape, s.dtype, s.init)
                                   for _ in range(2 if s.name in self._pingpong else 1)]
        self.current = {name: 0 for name in self.values}
        self._scratch: dict[tuple[str, str, int], Any] = {}
        self._bindings: dict[tuple, Any] = {}
        self._reads = {g: [s for s in self._bound_pairs if s.reads(g)] for g in self.graphs}
        # captured CUDA graphs for this stream, where the session allows them and a slot is free
        self.captured = {g: sessions[g].slots.claim() for g in sorted(self.graphs)}
        if any(self.captured.values()):
            # what a captured stream costs: its own fixed buffers (the graphs add little)
            log.info("stream state on %s:%d replays captured CUDA graphs for %s; its device "
                     "buffers take %.1f MB", self.device, self.device_id,
                     ", ".join(g for g, c in self.captured.items() if c), self.nbytes / 1e6)
        self._writes = {g: [s for s in self._bound_pairs if s.writes(g)] for g in self.graphs}

    # -- the host part (VAD) keeps StateStore's interface ------------------------------------
    @property
    def buffers(self) -> dict[str, np.ndarray]:
        return self.host.buffers

    def feeds(self, graph: str) -> dict[str, np.ndarray]:
        return self.host.feeds(graph)

    def update(self, graph: str, outputs: dict[str, np.ndarray], position: int = 0) -> None:
        self.host.update(graph, outputs, position)

    @property
    def nbytes(self) -> int:
        """Bytes of this stream's buffers: device state (both ping-pong halves), the bound
        scratch inputs/outputs allocated so far, and the host part (VAD)."""
        device = sum(np.prod(self.pairs[n].shape) * np.dtype(self.pairs[n].dtype).itemsize * len(v)
                     for n, v in self.values.items())
        scratch = sum(v.tensor_size_in_bytes() for v in getattr(self, "_scratch", {}).values())
        return int(device) + int(scratch) + self.host.nbytes

    # -- device buffers -----------------------------------------------------------------------
    def _alloc(self, shape: Sequence[int], dtype: str, init: float = 0.0) -> Any:
        v = self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.dtype(dtype).type,
                                                            self.device, self.device_id)
        self.writer.fill(v, shape, dtype, init)
        return v

    def _scratch_value(self, graph: str, spec: TensorSpec, size: int) -> Any:
        key = (graph, spec.name, size)
        v = self._scratch.get(key)
        if v is None:
            v = self._scratch[key] = self._alloc(_sized(spec.shape, size), spec.dtype)
        return v

    def value(self, name: str) -> np.ndarray:
        """A host copy of state `name` (tests, debugging)."""
        if name in self.values:
            return to_host(self.values[name][self.current[name]])
        return self.host.buffers[name]

    def _binding(self, graph: str, size: int) -> tuple[Any, dict[str, Any]]:
        """The IO binding of `graph` at run size `size` for the current ping-pong parity,
        built once: state inputs, state outputs and scratch buffers keep fixed addresses."""
        parity = tuple(self.current[s.name] for s in self._reads[graph] + self._writes[graph]
                       if s.name in self._pingpong)
        key = (graph, size, parity)
        cached = self._bindings.get(key)
        if cached is not None:
            return cached
        session = self.sessions[graph]
        spec = self.specs[graph]
        binding = session.session.io_binding()
        state_inputs = {s.input: s for s in self._reads[graph]}
        state_outputs = {s.output: s for s in self._writes[graph]}
        small: dict[str, Any] = {}
        for t in spec.inputs:
            s = state_inputs.get(t.name)
            if s is not None:
                binding.bind_ortvalue_input(t.name, self.values[s.name][self.current[s.name]])
            else:
                small[t.name] = self._scratch_value(graph, t, size)
                binding.bind_ortvalue_input(t.name, small[t.name])
        outputs: dict[str, Any] = {}
        for t in spec.outputs:
            s = state_outputs.get(t.name)
            if s is not None and s.update == "replace":
                cur = self.current[s.name]
                binding.bind_ortvalue_output(
                    t.name, self.values[s.name][1 - cur if s.name in self._pingpong else 0])
            else:  # append rows and plain outputs: a scratch buffer read after the run
                outputs[t.name] = self._scratch_value(graph, t, size)
                binding.bind_ortvalue_output(t.name, outputs[t.name])
        run_opts = None
        if session.capture.capture:  # one graph id per (graph, size, parity): fixed shapes
            run_opts = run_options(session.slots.next_id() if self.captured[graph] else -1)
        cached = self._bindings[key] = (binding, {"inputs": small, "outputs": outputs,
                                                  "run_options": run_opts})
        return cached

    def run(self, graph: str, inputs: Mapping[str, Any], position: int = 0,
            rows: Sequence[int] | None = None) -> StepOutputs:
        """Run `graph` on the device: `inputs` (numpy, or another step's output values) are
        copied into their bound buffers in place; state is read and written where it lives.
        `rows`: append only these rows of the append outputs (contiguous runs, each copied
        once)."""
        spec = self.specs[graph]
        size = self._size(spec, inputs)
        binding, bufs = self._binding(graph, size)
        for name, value in inputs.items():
            if isinstance(value, np.ndarray):
                bufs["inputs"][name].update_inplace(
                    np.ascontiguousarray(value, dtype=self._dtype(spec, name)))
            else:  # another step's output, still on the device: bound where it is
                bufs["inputs"][name] = value
                binding.bind_ortvalue_input(name, value)
        self.sessions[graph].run_bound(binding, size, bufs["run_options"])
        for s in self._writes[graph]:
            if s.update == "replace":
                if s.name in self._pingpong:
                    self.current[s.name] = 1 - self.current[s.name]
                continue
            out_spec = spec.output(s.output)
            src_shape = _sized(out_spec.shape, size)
            self._append(s, bufs["outputs"][s.output], src_shape, position, rows)
        self.writer.finish()
        return StepOutputs({k: v for k, v in bufs["outputs"].items()
                            if not any(w.output == k and w.update == "append"
                                       for w in self._writes[graph])})

    def _append(self, s: StatePair, src: Any, src_shape: tuple[int, ...], position: int,
                rows: Sequence[int] | None) -> None:
        axis = int(s.axis)
        picked = list(range(src_shape[axis])) if rows is None else [int(r) for r in rows]
        dst_pos = position
        for start, count in _runs(picked):
            # rows past the buffer's end belong to positions the model does not have: dropped
            count = max(0, min(count, s.shape[axis] - dst_pos))
            if count:
                self.writer.copy_rows(self.values[s.name][0], s.shape, src, src_shape, s.dtype,
                                      axis, start, count, dst_pos)
            dst_pos += count

    @staticmethod
    def _size(spec: Any, inputs: Mapping[str, Any]) -> int:
        for t in spec.inputs:
            for k, d in enumerate(t.shape):
                if isinstance(d, str):
                    return int(np.shape(inputs[t.name])[k])
        return 1

    @staticmethod
    def _dtype(spec: Any, name: str) -> str:
        t = spec.input(name)
        return t.dtype if t is not None else "float32"

    # -- lifecycle ------------------------------------------------------------------------------
    def reset(self, graphs: set[str] | None = None) -> None:
        """Initial values written in place (addresses stay: captured graphs stay valid)."""
        self.host.reset(graphs)
        for name, bufs in self.values.items():
            s = self.pairs[name]
            if graphs is None or any(s.reads(g) for g in graphs):
                self.writer.fill(bufs[self.current[name]], s.shape, s.dtype, s.init)
        self.writer.finish()

    def snapshot(self, graphs: set[str]) -> dict[str, np.ndarray]:
        out = self.host.snapshot(graphs)
        for name, bufs in self.values.items():
            s = self.pairs[name]
            if s.update == "replace" and any(s.reads(g) for g in graphs):
                out[name] = to_host(bufs[self.current[name]])
        return out

    def restore(self, snapshot: dict[str, np.ndarray]) -> None:
        host = {k: v for k, v in snapshot.items() if k not in self.values}
        self.host.restore(host)
        for name, value in snapshot.items():
            if name in self.values:
                self.values[name][self.current[name]].update_inplace(
                    np.ascontiguousarray(value))


def _runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """[(start, count)] of consecutive runs in `rows`."""
    out: list[tuple[int, int]] = []
    for r in rows:
        if out and out[-1][0] + out[-1][1] == r:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((r, 1))
    return out


def make_states(manifest: Manifest, sessions: Mapping[str, GraphSession],
                graphs: Iterable[str]) -> HostStates | BoundStates:
    """The state of one new stream, kept the way the sessions' `execution` says: bound on the
    device (auto on CUDA/TensorRT), or host arrays."""
    graphs = [g for g in graphs if g in sessions]
    first = sessions[graphs[0]]
    execution = first.config.execution
    if execution == "auto":
        execution = "bound" if device_of(first)[0] == "cuda" else "host"
    if execution == "bound":
        return BoundStates(manifest, sessions, graphs)
    return HostStates(manifest, sessions)
