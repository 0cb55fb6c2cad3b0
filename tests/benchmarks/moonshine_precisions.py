"""moonshine_streaming at a published size (random weights): the size table of every precision
(fp32, fp16, int8, int4, int8-nbits, int8-qdq and two per-graph mixes), how far a K-token block
and K single decoder steps are apart (exact re-scoring needs them within 1e-4), the median decoder
step and 16-token block, and the resident memory of a fresh process that opens the bundle and
decodes (peak RSS), with ratios against fp32, all in one run.

Run as a script: `.venv/bin/python tests/benchmarks/moonshine_precisions.py --size tiny`.
Random weights: sizes and times do not depend on them; the block/step agreement does not either
(it is a property of the kernels: activations quantized or not). Each variant is measured in its
own process (`--measure DIR`), so one's memory does not count against the next. fp16 is for GPUs:
the CPU provider computes it in fp32 (its times here say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech"
CLIP = SPEECH / "beckett.wav"
GRAPHS = ("encoder", "memory", "decoder")
VARIANTS = {  # name: {graph: precision}
    "fp16": dict.fromkeys(GRAPHS, "fp16"),
    "int8": dict.fromkeys(GRAPHS, "int8"),
    "int4": dict.fromkeys(GRAPHS, "int4"),
    "int8-nbits": dict.fromkeys(GRAPHS, "int8-nbits"),
    "int8-qdq": dict.fromkeys(GRAPHS, "int8-qdq"),
    "int8 + dec int8-nbits": {"encoder": "int8", "memory": "int8", "decoder": "int8-nbits"},
    "int8 + dec int4": {"encoder": "int8", "memory": "int8", "decoder": "int4"},
}


def mb(root: Path) -> dict[str, float]:
    data = json.loads((root / "manifest.json").read_text())
    return {g["name"]: (root / g["file"]).stat().st_size / 1e6 for g in data["graphs"]
            if g["name"] != data.get("vad")}


def measure(root: Path, runs: int) -> dict:
    """In this (fresh) process: open the bundle, stream 3 s of speech, then a 16-token block and
    16 one-token steps `runs` times; medians, the block/step difference and peak RSS."""
    from edgestream.runtime.audio.wav import read_wav, to_mono
    from edgestream.runtime.bundle import Bundle
    from edgestream.runtime.families.moonshine.engine import StreamingEncDecEngine
    from edgestream.runtime.session import SessionConfig

    audio = to_mono(read_wav(CLIP).samples).astype(np.float32)[: 3 * 16000]
    engine = StreamingEncDecEngine(Bundle.open(root, SessionConfig("cpu", 2)))
    t0 = time.perf_counter()
    for s in range(0, audio.size - engine.chunk + 1, engine.chunk):
        engine.push(audio[s: s + engine.chunk])
    engine.flush()
    encode = time.perf_counter() - t0
    seq = [1] + [int(t) for t in np.random.default_rng(0).integers(4, 32000, 15)]
    blocks, steps_ms, diffs = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        block = engine.block(seq, 0)
        blocks.append(time.perf_counter() - t0)
        steps = []
        for i, t in enumerate(seq):
            t0 = time.perf_counter()
            steps.append(engine.step(t, i))
            steps_ms.append(time.perf_counter() - t0)
        diffs.append(float(np.abs(block - np.stack(steps)).max()))
    return {"block_step": max(diffs), "step_ms": statistics.median(steps_ms) * 1e3,
            "block_ms": statistics.median(blocks) * 1e3, "encode_3s_ms": encode * 1e3,
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries
    ru_maxrss across exec, so a child started from the (torch-laden) parent would report the
    parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def build(root: Path, size: str, block_size: int) -> tuple[dict[str, Path], int]:
    """The fp32 bundle (parity-checked export) and every variant under `root`, reused when a
    previous run left them there; returns ({variant: folder}, parameter count)."""
    from edgestream.export.quantize import quantize_graphs

    # the streaming benchmark's model builder; imported here, not at the top, so that the
    # `--measure` processes never load torch (it would set their peak RSS)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from moonshine_streaming import prepare

    done = root / "done.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved["size"] == size and saved["block_size"] == block_size:
            return {k: Path(v) for k, v in saved["bundles"].items()}, saved["params"]
    info = prepare(size, root, 80, False, CLIP)
    fp32 = info["bundles"]["fp32"]
    calibration = root / "calibration"  # int8-qdq: calibrated on one real clip (speed)
    calibration.mkdir(exist_ok=True)
    shutil.copy(CLIP, calibration / CLIP.name)
    (calibration / "refs.tsv").write_text(f"{CLIP.name}\tcalibration only\n")
    bundles = {"fp32": fp32}
    for name, plan in VARIANTS.items():
        folder = root / name.replace(" ", "_")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(fp32, folder)
        data = quantize_graphs(folder, json.loads((fp32 / "manifest.json").read_text()), plan,
                               block_size=block_size, calibration_audio=calibration)
        (folder / "manifest.json").write_text(json.dumps(data))
        bundles[name] = folder
    done.write_text(json.dumps({"size": size, "block_size": block_size, "params": info["params"],
                                "bundles": {k: str(v) for k, v in bundles.items()}}))
    return bundles, info["params"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--work", type=Path, help="keep the bundles here and reuse them (build "
                   "them once without the bench lock, then time under it)")
    p.add_argument("--prepare-only", action="store_true", help="build the bundles, time nothing")
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # one variant, this process
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.runs)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = args.work or Path(tmp)
        bundles, params = build(root, args.size, args.block_size)
        if args.prepare_only:
            return 0
        print(f"moonshine_streaming {args.size} ({params / 1e6:.0f} M params, random "
              f"weights), MatMulNBits block size {args.block_size}, 2 threads, medians of "
              f"{args.runs} x 16 steps / {args.runs} blocks; load {os.getloadavg()[0]:.2f}")
        head = (f"{'variant':22} {'encoder':>8} {'memory':>7} {'decoder':>8} {'total MB':>9} "
                f"{'x fp32':>7} {'|block-step|':>13} {'step ms':>8} {'x fp32':>7} "
                f"{'block16 ms':>11} {'enc 3s ms':>10} {'peak RSS MB':>12}")
        print(head)
        base: dict = {}
        for name, b in bundles.items():
            out = subprocess.run([sys.executable, __file__, "--measure", str(b), "--runs",
                                  str(args.runs)], check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            sizes = mb(b)
            total = sum(sizes.values())
            base = base or {"total": total, "step": r["step_ms"]}
            print(f"{name:22} {sizes['encoder']:8.1f} {sizes['memory']:7.1f} "
                  f"{sizes['decoder']:8.1f} {total:9.1f} {total / base['total']:7.2f} "
                  f"{r['block_step']:13.2e} {r['step_ms']:8.2f} "
                  f"{r['step_ms'] / base['step']:7.2f} {r['block_ms']:11.2f} "
                  f"{r['encode_3s_ms']:10.1f} {r['peak_rss_mb']:12.0f}", flush=True)
        print(f"load average after the run: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
