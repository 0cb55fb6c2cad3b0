"""`edgestream warmup BUNDLE [--profile P]`: build what a device would otherwise build on the
first utterance, ahead of time.

On TensorRT this is the engine and timing caches of every graph (a build takes seconds to
minutes): they are written into the cache folder (`$EDGESTREAM_CACHE/tensorrt/<graph hash>`,
default ~/.cache/edgestream/tensorrt) from which every later session of the same graph file
loads them (runtime/session.py `tensorrt_cache_options`). Every graph then runs once at each of
its declared shapes (a decoder at 1 and K tokens), so CUDA kernels and cuDNN algorithms are
chosen too. Where TensorRT is not available, it says so and warms up on the provider that will
run the bundle (the CPU here: a first-run check, nothing is cached).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgestream.runtime.bundle import Bundle
from edgestream.runtime.manifest import GraphSpec, Manifest
from edgestream.runtime.session import (SessionConfig, session_config, tensorrt_cache_dir)


def declared_feeds(manifest: Manifest, graph: GraphSpec, size: int) -> dict[str, np.ndarray]:
    """Inputs of `graph` at run size `size`: states at their initial values, the rest zeros."""
    init = {s.input: s.init for s in manifest.states if s.reads(graph.name)}
    if graph.name == manifest.vad:  # Silero branches on its sample-rate input
        init["sr"] = manifest.audio.sample_rate
    feeds = {}
    for t in graph.inputs:
        shape = tuple(size if isinstance(d, str) else d for d in t.shape)
        feeds[t.name] = np.full(shape, init.get(t.name, 0), dtype=t.dtype)
    return feeds


def warm(bundle: Bundle) -> list[dict[str, Any]]:
    """Run every graph once at each declared size; the first and a second run's times."""
    rows = []
    m = bundle.manifest
    for g in m.graphs:
        session = bundle.sessions[g.name]
        sizes = sorted({n for dims in g.dims.values() for n in dims}) or [1]
        for size in sizes:
            feeds = declared_feeds(m, g, size)
            times = []
            for _ in range(2):
                started = time.perf_counter()
                session.run(feeds)
                times.append((time.perf_counter() - started) * 1000.0)
            rows.append({"graph": g.name, "size": size, "provider": session.provider,
                         "first_ms": times[0], "second_ms": times[1]})
    return rows


def run_warmup(bundle_dir: Path, profile: str, provider: str, cache_dir: Path | None) -> int:
    import onnxruntime as ort

    if cache_dir is not None:  # the sessions read the cache folder from the environment
        os.environ["EDGESTREAM_CACHE"] = str(cache_dir)
    available = ort.get_available_providers()
    # TensorRT asked for but missing falls back to what the profile would run, with a message
    config = session_config("auto" if provider == "tensorrt" else provider, 0, profile)
    from edgestream.runtime.profiles import resolve

    wanted = resolve(profile).providers if provider == "auto" else (provider,)
    if "tensorrt" in wanted and "TensorrtExecutionProvider" in available:
        config = SessionConfig("tensorrt", config.threads, config.provider_options, "host")
        print(f"TensorRT engine and timing caches: {tensorrt_cache_dir()}")
    elif "tensorrt" in wanted:
        print(f"TensorRT is not available in this onnxruntime (it offers {', '.join(available)}):"
              f" no engine cache to build; warming up on {config.provider} instead")
    else:
        print(f"profile wants {', '.join(wanted)}: no TensorRT engines to build; warming up on "
              f"{config.provider}")
    bundle = Bundle.open(bundle_dir, SessionConfig(config.provider, config.threads,
                                                   config.provider_options, "host"))
    print(f"{'graph':<10} {'size':>4}  {'provider':<28} {'first run':>10} {'next run':>10}")
    for r in warm(bundle):
        print(f"{r['graph']:<10} {r['size']:>4}  {r['provider']:<28} {r['first_ms']:>8.1f} ms "
              f"{r['second_ms']:>7.1f} ms")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from edgestream.runtime import profiles

    p = sub.add_parser("warmup", help="build TensorRT caches and run every graph once, ahead of "
                                      "the first utterance")
    p.add_argument("bundle", type=Path)
    p.add_argument("--profile", default="auto",
                   help=f"auto (detect) or one of {', '.join(profiles.names())}, or a TOML file")
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda", "tensorrt"],
                   help="override the profile's provider order")
    p.add_argument("--cache-dir", type=Path,
                   help="cache folder (default $EDGESTREAM_CACHE or ~/.cache/edgestream); give "
                        "the same EDGESTREAM_CACHE to `run`")
    p.set_defaults(handler=lambda a: run_warmup(a.bundle, a.profile, a.provider, a.cache_dir))
