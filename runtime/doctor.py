"""`edgestream doctor [BUNDLE]`: is this device set up right, proven by real inference.

A provider that onnxruntime lists can still be unusable: the CUDA provider silently falls back
to the CPU when its libraries do not load, and a wheel can list CUDA and fail at the first
kernel (cuDNN missing, CUDA mismatch). So each provider the profile wants runs a small built-in
graph (Conv, MatMul, Softmax: cuDNN and cuBLAS) checked against numpy, and, given a bundle,
every graph of the bundle checked against the CPU provider. The exit code is non-zero when the
profile's first provider does not really work.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from edgestream.runtime import profiles
from edgestream.runtime.session import provider_options

ORT_NAME = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
            "tensorrt": "TensorrtExecutionProvider"}
TOLERANCE = 1e-3  # fp32 on another provider: kernels differ in summation order, not more


def doctor_weights() -> dict[str, np.ndarray]:
    conv = np.sin(np.arange(8 * 4 * 3, dtype=np.float32)).reshape(8, 4, 3) * 0.5
    proj = np.cos(np.arange(8 * 10, dtype=np.float32)).reshape(8, 10) * 0.3
    bias = np.linspace(-1, 1, 10, dtype=np.float32)
    return {"conv": conv, "proj": proj, "bias": bias}


def doctor_input() -> np.ndarray:
    return np.tanh(np.arange(64, dtype=np.float32).reshape(1, 4, 16) * 0.37 - 3.0)


def expected_output(x: np.ndarray) -> np.ndarray:
    """The doctor graph in numpy: Conv1d (pad 1), Relu, MatMul, Add, Softmax."""
    w = doctor_weights()
    padded = np.pad(x[0], ((0, 0), (1, 1)))
    windows = np.stack([padded[:, i: i + 3] for i in range(x.shape[2])])  # [16, 4, 3]
    conv = np.einsum("tck,ock->to", windows, w["conv"])  # [16, 8]
    logits = np.maximum(conv, 0) @ w["proj"] + w["bias"]
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True))[None]


@dataclass(frozen=True)
class Check:
    provider: str
    what: str
    ok: bool
    detail: str


def _session(path: Path | bytes, provider: str, options: dict) -> tuple[object, list[str]]:
    import onnxruntime as ort

    # the provider alone: onnxruntime adds the CPU behind it only for nodes it cannot place,
    # and a provider that fails to load shows up as the CPU in get_providers()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(str(path) if isinstance(path, Path) else path, so,
                                   providers=[ORT_NAME[provider]],
                                   provider_options=[provider_options(
                                       provider, options.get(provider, {}))])
    return session, session.get_providers()


def check_provider(provider: str, options: dict) -> Check:
    """Run the built-in graph on `provider` alone and compare with numpy."""
    graph = resources.files("edgestream.runtime") / "assets" / "doctor.onnx"
    try:
        session, used = _session(graph.read_bytes(), provider, options)
    except Exception as e:  # onnxruntime raises plain RuntimeError/Fail for provider failures
        return Check(provider, "built-in graph", False, f"session could not be created: {e}")
    if used[0] != ORT_NAME[provider]:
        return Check(provider, "built-in graph", False,
                     f"onnxruntime fell back to {used[0]}: {ORT_NAME[provider]} did not load "
                     "(missing CUDA/cuDNN/TensorRT libraries, or a wheel built for another "
                     "CUDA); see devices/README.md")
    x = doctor_input()
    try:
        started = time.perf_counter()
        y = session.run(None, {"x": x})[0]
        ms = (time.perf_counter() - started) * 1000
    except Exception as e:
        return Check(provider, "built-in graph", False, f"the first kernel failed: {e}")
    err = float(np.abs(y - expected_output(x)).max())
    if not np.isfinite(y).all() or err > TOLERANCE:
        return Check(provider, "built-in graph", False,
                     f"wrong numbers: max difference from numpy {err:.2e} (> {TOLERANCE})")
    return Check(provider, "built-in graph", True, f"{ms:.1f} ms first run, max diff {err:.1e}")


def check_bundle(bundle_dir: Path, provider: str, options: dict) -> list[Check]:
    """Every graph of the bundle on `provider`, against the CPU provider, same inputs."""
    from edgestream.runtime.bundle import Bundle

    bundle = Bundle.open(bundle_dir)
    checks = []
    rng = np.random.default_rng(0)
    for spec in bundle.manifest.graphs:
        name, path = spec.name, bundle.root / spec.file
        if spec.name == "vad" and provider != "cpu":
            checks.append(Check(provider, name, True, "runs on the CPU by design (tiny, "
                                "recurrent: a GPU launch costs more than it computes)"))
            continue
        feeds = {}
        for t in spec.inputs:
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in t.shape]
            if t.dtype.startswith("float"):
                feeds[t.name] = rng.standard_normal(shape).astype(t.dtype) * 0.1
            elif t.name == "sr":  # Silero's sample-rate input
                feeds[t.name] = np.full(shape, bundle.manifest.audio.sample_rate, t.dtype)
            else:
                feeds[t.name] = np.zeros(shape, t.dtype)
        try:
            session, used = _session(path, provider, options)
            if used[0] != ORT_NAME[provider]:
                checks.append(Check(provider, name, False, f"fell back to {used[0]}"))
                continue
            got = session.run(None, feeds)
            want = _session(path, "cpu", {})[0].run(None, feeds) if provider != "cpu" else got
        except Exception as e:
            checks.append(Check(provider, name, False, f"failed: {e}"))
            continue
        diffs = [float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0
                 for a, b in zip(got, want)]
        finite = all(np.isfinite(a).all() for a in got if a.dtype.kind == "f")
        # fp16 graphs run in fp16 on a GPU but in fp32 on the CPU: a looser bound for them
        ok = finite and max(diffs, default=0.0) <= (1e-2 if spec.precision == "fp16"
                                                    else TOLERANCE)
        detail = "ran, outputs finite" if provider == "cpu" else \
            f"max diff vs CPU {max(diffs, default=0):.1e}"
        checks.append(Check(provider, name, ok, detail + ("" if finite else
                                                          ", NaN/Inf in outputs")))
    return checks


def run_doctor(bundle: Path | None, profile_spec: str) -> int:
    import onnxruntime as ort

    facts = profiles.device_facts()
    profile = profiles.resolve(profile_spec)
    print(f"device: {facts.arch}" + (f", {facts.jetson_model}" if facts.jetson_model else "")
          + (f", GPU {', '.join(facts.gpus)}" if facts.gpus else ", no NVIDIA GPU seen"))
    print(f"profile: {profile.name} ({'detected' if profile_spec in ('', 'auto') else 'chosen'})"
          f" - {profile.description}")
    print(f"  providers {', '.join(profile.providers)}; threads {profile.threads or 'default'};"
          f" precision {profile.precision or 'any'}; budget {profile.memory.budget_mb} MB; "
          f"captured CUDA graph streams {profile.memory.cuda_graph_streams}")
    print(f"onnxruntime {ort.__version__}: lists {', '.join(ort.get_available_providers())}")
    first_ok = True
    for i, provider in enumerate(profile.providers):
        if ORT_NAME[provider] not in ort.get_available_providers():
            checks = [Check(provider, "listed", False,
                            f"{ORT_NAME[provider]} is not in this onnxruntime: install "
                            "onnxruntime-gpu (Jetson: NVIDIA's wheel for your JetPack)")]
        else:
            options = profile.provider_options
            checks = [check_provider(provider, options)]
            if bundle is not None and checks[0].ok:
                checks += check_bundle(bundle, provider, options)
        for c in checks:
            print(f"  [{'ok' if c.ok else 'FAIL'}] {c.provider}: {c.what}: {c.detail}")
        if i == 0:
            first_ok = all(c.ok for c in checks)
    if bundle is not None:
        _precision_note(bundle, profile)
    verdict = "works" if first_ok else "does NOT work"
    print(f"verdict: the profile's first provider ({profile.providers[0]}) {verdict} here")
    return 0 if first_ok else 4


def _precision_note(bundle: Path, profile: profiles.Profile) -> None:
    from edgestream.runtime.bundle import Bundle

    m = Bundle.open(bundle).manifest
    have = ", ".join(f"{g.name} {g.precision}" for g in m.graphs)
    print(f"bundle: {m.family}/{m.pipeline}: {have}; this profile prefers "
          f"{profile.precision or 'any'}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check this device: profile, providers, a real inference")
    p.add_argument("bundle", type=Path, nargs="?", help="also run every graph of this bundle")
    p.add_argument("--profile", default="auto",
                   help=f"auto (detect) or one of {', '.join(profiles.names())}, or a TOML file")
    p.set_defaults(handler=lambda args: run_doctor(args.bundle, args.profile))
