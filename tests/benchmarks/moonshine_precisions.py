"""moonshine_streaming at a published size (random weights): the size table of fp32, int8,
int4 and int8-nbits bundles, and how far a K-token block and K single decoder steps are apart
(exact re-scoring needs them within 1e-4), plus the median decoder step per precision.

Run as a script: `.venv/bin/python tests/benchmarks/moonshine_precisions.py --size tiny`.
Random weights: sizes and times do not depend on them; the block/step agreement does not either
(it is a property of the kernels: per-row activation quantization or not).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moonshine_streaming import prepare  # noqa: E402  (the benchmark's own model builder)

SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech"
PRECISIONS = ("int8", "int4", "int8-nbits")


def mb(root: Path) -> dict[str, float]:
    data = json.loads((root / "manifest.json").read_text())
    return {g["name"]: (root / g["file"]).stat().st_size / 1e6 for g in data["graphs"]
            if g["name"] != data.get("vad")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--block-size", type=int, default=32)
    args = p.parse_args(argv)

    from edgestream.export.quantize import quantize_graphs
    from edgestream.runtime.audio.wav import read_wav, to_mono
    from edgestream.runtime.bundle import Bundle
    from edgestream.runtime.families.moonshine.engine import StreamingEncDecEngine
    from edgestream.runtime.session import SessionConfig

    clip = SPEECH / "beckett.wav"
    audio = to_mono(read_wav(clip).samples).astype(np.float32)[: 3 * 16000]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        info = prepare(args.size, root, 80, False, clip)
        fp32 = info["bundles"]["fp32"]
        bundles = {"fp32": fp32}
        for prec in PRECISIONS:
            shutil.copytree(fp32, root / prec)
            plan = {"encoder": prec, "memory": prec, "decoder": prec}
            data = quantize_graphs(root / prec, json.loads((fp32 / "manifest.json").read_text()),
                                   plan, block_size=args.block_size)
            (root / prec / "manifest.json").write_text(json.dumps(data))
            bundles[prec] = root / prec
        print(f"moonshine_streaming {args.size} ({info['params'] / 1e6:.0f} M params, random "
              f"weights), block size {args.block_size}, 2 threads")
        print(f"{'precision':11} {'encoder':>8} {'memory':>7} {'decoder':>8} {'total MB':>9} "
              f"{'|block-step|':>13} {'step ms':>8}")
        for name, b in bundles.items():
            engine = StreamingEncDecEngine(Bundle.open(b, SessionConfig("cpu", 2)))
            for s in range(0, audio.size - engine.chunk + 1, engine.chunk):
                engine.push(audio[s: s + engine.chunk])
            engine.flush()
            seq = [1] + [int(t) for t in np.random.default_rng(0).integers(4, 32000, 15)]
            block = engine.block(seq, 0)
            steps, times = [], []
            for i, t in enumerate(seq):
                t0 = time.perf_counter()
                steps.append(engine.step(t, i))
                times.append(time.perf_counter() - t0)
            diff = float(np.abs(block - np.stack(steps)).max())
            sizes = mb(b)
            print(f"{name:11} {sizes['encoder']:8.1f} {sizes['memory']:7.1f} "
                  f"{sizes['decoder']:8.1f} {sum(sizes.values()):9.1f} {diff:13.2e} "
                  f"{statistics.median(times) * 1e3:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
