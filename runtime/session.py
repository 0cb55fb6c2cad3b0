"""onnxruntime sessions for bundle graphs: provider choice and options, threading, signature
check, and what each graph's runs cost on which provider."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgestream.runtime import huge_pages
from edgestream.runtime.cuda_graphs import CaptureDecision, CaptureSlots, decide
from edgestream.runtime.errors import BundleError, OptionError, ProviderError
from edgestream.runtime.events.stats import Histogram
from edgestream.runtime.manifest import GraphSpec, TensorSpec
from edgestream.runtime.memory import packed_allocations, return_large_blocks

log = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
    "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
}
_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
SHORT_NAME = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda",
              "TensorrtExecutionProvider": "tensorrt"}
EXECUTIONS = ("auto", "host", "bound")


@dataclass(frozen=True)
class SessionConfig:
    """How graphs are run.

    `provider`: auto, cpu, cuda or tensorrt. `threads`: 0 = onnxruntime's default.
    `provider_options`: per provider short name (cuda, tensorrt, cpu), the device profile's
    `[providers.*]` tables (`device_id`, `cudnn_conv_algo_search`, `gpu_mem_limit_mb`, ...).
    `execution`: host (numpy feeds, state in host arrays), bound (state resident on the
    execution device, IO binding) or auto (bound on CUDA/TensorRT, host on the CPU).
    `captured_streams`: how many streams of this model may replay captured CUDA graphs (the
    profile's `memory.cuda_graph_streams`).
    """

    provider: str = "auto"
    threads: int = 0
    provider_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    execution: str = "auto"
    captured_streams: int = 0

    def on_cpu(self) -> "SessionConfig":
        """The same threading on the CPU provider (graphs too small to gain from a GPU)."""
        return replace(self, provider="cpu", execution="host", captured_streams=0)


def provider_options(name: str, options: dict[str, Any]) -> dict[str, str]:
    """A profile's `[providers.NAME]` table as onnxruntime provider options (strings): sizes in
    MB become bytes, `fp16` becomes TensorRT's `trt_fp16_enable`; other keys pass through."""
    out: dict[str, str] = {}
    for key, value in options.items():
        if key == "gpu_mem_limit_mb":
            key, value = "gpu_mem_limit", int(value) * 2**20
        elif key == "fp16" and name == "tensorrt":
            key = "trt_fp16_enable"
        out[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


def tensorrt_cache_dir() -> Path:
    """Where TensorRT engine and timing caches live (built ahead by `edgestream warmup`):
    $EDGESTREAM_CACHE/tensorrt, default ~/.cache/edgestream/tensorrt."""
    import os

    base = os.environ.get("EDGESTREAM_CACHE") or str(Path.home() / ".cache" / "edgestream")
    return Path(base) / "tensorrt"


def tensorrt_cache_options(graph_sha256: str) -> dict[str, str]:
    """TensorRT options that read (and on a miss write) the engine and timing caches of one
    graph file: a changed graph gets its own folder, so a stale engine is never used."""
    folder = tensorrt_cache_dir() / graph_sha256[:16]
    return {"trt_engine_cache_enable": "1", "trt_engine_cache_path": str(folder),
            "trt_timing_cache_enable": "1", "trt_timing_cache_path": str(folder)}


def resolve_providers(provider: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider == "auto":
        for name in ("cuda", "cpu"):
            if _PROVIDERS[name][0] in available:
                return _PROVIDERS[name]
    if provider not in _PROVIDERS:
        raise ProviderError(f"provider {provider!r} is unknown; use one of auto, "
                            f"{', '.join(_PROVIDERS)}")
    wanted = _PROVIDERS[provider]
    if wanted[0] not in available:
        raise ProviderError(
            f"provider {provider!r} needs {wanted[0]}, but this onnxruntime offers only "
            f"{', '.join(available)}; install onnxruntime-gpu (Jetson: NVIDIA's wheel) or use "
            "--provider cpu")
    return wanted


def check_execution(execution: str) -> None:
    if execution not in EXECUTIONS:
        raise OptionError(f"execution={execution!r}: use auto (bound on a GPU, host on the CPU), "
                          "host (numpy feeds) or bound (state resident on the device, IO binding)")


def session_config(provider: str = "auto", threads: int = 0, profile: Any = None,
                   execution: str = "auto") -> SessionConfig:
    """The session configuration from explicit choices and a device profile (a name, a TOML
    path, "auto" to detect, or a loaded `Profile`). An explicit provider or thread count wins;
    with provider "auto" the profile's first provider that this onnxruntime offers is used."""
    if profile is None:
        return SessionConfig(provider, threads, execution=execution)
    from edgestream.runtime.profiles import Profile, resolve

    prof = profile if isinstance(profile, Profile) else resolve(str(profile))
    if provider == "auto":
        import onnxruntime as ort

        available = set(ort.get_available_providers())
        provider = next((p for p in prof.providers if _PROVIDERS[p][0] in available), "cpu")
        if provider != prof.providers[0]:
            log.warning("profile %s wants %s first, but this onnxruntime offers only %s; using %s "
                        "(run `edgestream doctor` to see why)", prof.name, prof.providers[0],
                        ", ".join(sorted(available)), provider)
    return SessionConfig(provider, threads or prof.threads,
                         {k: dict(v) for k, v in prof.provider_options.items()}, execution,
                         prof.memory.cuda_graph_streams)


class GraphTimes:
    """Run times of one graph in bounded memory, per run size (e.g. tokens 1 and K)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # streams of one model may run this graph concurrently
        self.by_size: dict[int, Histogram] = {}

    def add(self, size: int, ms: float) -> None:
        with self._lock:
            h = self.by_size.get(size)
            if h is None:
                h = self.by_size[size] = Histogram()
            h.add(ms)


class GraphSession:
    """One graph's onnxruntime session whose signature was checked against the manifest."""

    def __init__(self, path: Path, spec: GraphSpec, config: SessionConfig,
                 shrink_arena: bool = False, pack_weights: bool = False) -> None:
        """`shrink_arena`: hand the CPU arena's free blocks back to the OS after each host run.
        For a graph that runs seldom with large activations (Whisper's encoder, once per 30 s
        window) the blocks would otherwise stay resident while the decoder runs, and the
        decoder's own blocks would come on top of them at the process's peak.
        `pack_weights`: the prepacked weights are allocated one after another in the heap
        (`memory.packed_allocations`), so that most of them can go on huge pages."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if config.threads:
            opts.intra_op_num_threads = config.threads
        # Several sessions alternate on few cores: spinning threads would fight each other.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The memory pattern allocates one block for a run's planned activations on the second
        # run, beside the arena that already holds the first run's: a Whisper tiny.en encoder
        # window took 50 MB more resident memory from its second run on, for no speed gain.
        opts.enable_mem_pattern = False
        # which provider each node landed on: `stats` and the CUDA-graph check read it
        opts.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        opts.log_severity_level = 3
        providers = resolve_providers(config.provider)
        options = [provider_options(SHORT_NAME[p], config.provider_options.get(SHORT_NAME[p], {}))
                   for p in providers]
        if "tensorrt" == SHORT_NAME[providers[0]]:
            options[0] = {**tensorrt_cache_options(spec.sha256), **options[0]}
        self.spec = spec
        self.path = path
        self._run_options = None
        if shrink_arena:
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage",
                                                   "cpu:0")
        self.config = config
        # large blocks in mappings of their own (not reused heap space), so the weights this
        # session allocates show up as new mappings that `huge_pages` can collapse. Packed into
        # the heap only where asked (the LM): the heap then holds the weights below later small
        # blocks, and what those leave free stays resident (Whisper tiny.en's decoder packed:
        # 15 MB more resident after a transcription)
        return_large_blocks()
        before = huge_pages.anonymous_regions()
        with packed_allocations() if pack_weights else contextlib.nullcontext():
            self.session = self._open(ort, opts, providers, options)
        self.capture = decide(spec.name, self.provider, config.execution,
                              config.captured_streams, self.node_providers())
        if self.capture.capture:
            # partitioning showed every node on CUDA: reopen with capture enabled
            cuda = providers.index("CUDAExecutionProvider")
            options[cuda] = {**options[cuda], "enable_cuda_graph": "1"}
            try:
                self.session = self._open(ort, opts, providers, options)
            except BundleError as e:
                self.capture = CaptureDecision(spec.name, False, f"onnxruntime refused ({e})")
        if config.provider != "cpu" and config.captured_streams > 0:
            log.info("%s", self.capture.log_line())
        self.slots = CaptureSlots(config.captured_streams if self.capture.capture else 0)
        # the weights onnxruntime just prepacked, on 2 MiB pages (see huge_pages)
        self.huge_page_bytes = huge_pages.collapse_new(before)
        self._check(self.session.get_inputs(), spec.inputs, "input")
        self._check(self.session.get_outputs(), spec.outputs, "output")
        self.output_names = [t.name for t in spec.outputs]
        self.times = GraphTimes()
        # the first declared symbolic axis sizes the histograms (tokens 1 vs K)
        self._sized = next(((t.name, k) for t in spec.inputs for k, d in enumerate(t.shape)
                            if isinstance(d, str)), None)

    def _open(self, ort: Any, opts: Any, providers: list[str], options: list[dict[str, str]]
              ) -> Any:
        try:
            return ort.InferenceSession(str(self.path), opts, providers=providers,
                                        provider_options=options)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise BundleError(f"{self.path}: onnxruntime cannot load this graph ({e}); "
                              "re-export the bundle") from e

    def _check(self, actual: list, declared: tuple[TensorSpec, ...], kind: str) -> None:
        got = {a.name: a for a in actual}
        if set(got) != {t.name for t in declared}:
            raise BundleError(
                f"{self.path}: {kind}s {sorted(got)} do not match manifest graphs[{self.spec.name}]"
                f".{kind}s {sorted(t.name for t in declared)}; the bundle is inconsistent, "
                "re-export it")
        for t in declared:
            a = got[t.name]
            dtype = _ORT_TYPES.get(a.type, a.type)
            # a symbolic dimension in the file accepts the manifest's static size; a named axis
            # in the manifest (run at the sizes of `dims`) must be symbolic in the file
            shape_ok = len(a.shape) == len(t.shape) and all(
                (not isinstance(d, int) or d == s)
                and (isinstance(s, int) or not isinstance(d, int))
                for d, s in zip(a.shape, t.shape))
            if dtype != t.dtype or not shape_ok:
                raise BundleError(
                    f"{self.path}: {kind} {t.name!r} is {dtype} {list(a.shape)} but the manifest "
                    f"says {t.dtype} {list(t.shape)}; re-export the bundle")

    @property
    def provider(self) -> str:
        """The provider this session really runs on (onnxruntime's first registered one: a
        provider that failed to load is missing from the list)."""
        return self.session.get_providers()[0]

    def node_providers(self) -> list[tuple[str, str, str]]:
        """(provider, node name, op type) of every node after partitioning."""
        return [(sub.ep_name, n.name, n.op_type)
                for sub in self.session.get_provider_graph_assignment_info()
                for n in sub.get_nodes()]

    def _size(self, feeds: dict[str, Any]) -> int:
        if self._sized is None:
            return 1
        name, axis = self._sized
        return int(feeds[name].shape[axis])

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        outs = self.session.run(self.output_names, feeds, self._run_options)
        self.times.add(self._size(feeds), (time.perf_counter() - started) * 1000.0)
        return dict(zip(self.output_names, outs))

    def run_bound(self, binding: Any, size: int, run_options: Any = None) -> None:
        """Run with an IO binding (state on the device); synchronises the outputs, so the
        recorded time is the step's device time plus launch overhead."""
        started = time.perf_counter()
        self.session.run_with_iobinding(binding, run_options)
        self.times.add(size, (time.perf_counter() - started) * 1000.0)
