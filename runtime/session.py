"""onnxruntime sessions for bundle graphs: provider choice, threading, signature check."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgestream.runtime.errors import BundleError, ProviderError
from edgestream.runtime.manifest import GraphSpec, TensorSpec

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


@dataclass(frozen=True)
class SessionConfig:
    """How graphs are run: `provider` is auto, cpu, cuda or tensorrt; `threads` 0 = ort default."""

    provider: str = "auto"
    threads: int = 0


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


class GraphSession:
    """One graph's onnxruntime session whose signature was checked against the manifest."""

    def __init__(self, path: Path, spec: GraphSpec, config: SessionConfig) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if config.threads:
            opts.intra_op_num_threads = config.threads
        # Several sessions alternate on few cores: spinning threads would fight each other.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts,
                                                providers=resolve_providers(config.provider))
        except ProviderError:
            raise
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise BundleError(f"{path}: onnxruntime cannot load this graph ({e}); "
                              "re-export the bundle") from e
        self.spec = spec
        self.path = path
        self._check(self.session.get_inputs(), spec.inputs, "input")
        self._check(self.session.get_outputs(), spec.outputs, "output")
        self.output_names = [t.name for t in spec.outputs]

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

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outs))
