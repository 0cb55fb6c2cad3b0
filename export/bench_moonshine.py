"""moonshine_streaming on CPU at the published sizes (random weights): our bundle vs transformers.

Per size (DESIGN.md section 3) a random-weight model is built, saved with a 32768-word tokenizer,
exported with `export_bundle` (parity on 12 s of two_cities.wav, reported) and optionally
quantized to int8 (encoder, memory, decoder, decoder_block). On the first `--seconds` of
two_cities.wav, all in one run with the engines' order rotated each repetition, it measures:
1. the encoder path: `push` (encoder + memory) per chunk, p50/p95/p99 ms over all chunks of all
   runs, and its real-time factor (sum of push time / audio time);
2. the whole stream as the driver runs it: a push per chunk and a partial re-decode whenever 200 ms
   of audio arrived since the last (the driver's counter: every 240 ms at 80 ms chunks). Random
   weights never say eos, so each decode is exactly round(3.0 tokens/s x audio so far) tokens
   (`stop_at_eos=False`), re-scoring the last partial through `decoder_block` ("rescored"), or
   from scratch (`hint=()`, "naive"); the flush and the final decode are included. Reported as
   compute per second of audio (whole-stream RTF), with the share of the previous hypothesis that
   the new one kept (random weights make this pessimistic or optimistic: it is printed);
3. end of speech to final compute: flush + final decode (re-scored from the last partial);
4. transformers eager as a non-streaming user: at each update point, `generate` on the whole
   utterance so far (encoder over all audio + greedy KV-cached decode of the same token count);
   timed on every `--eager-every`-th update point and scaled to all of them (printed), plus the
   final run on the whole utterance, which is its end-of-speech compute;
5. state bytes per stream (every StateStore buffer), split encoder / cross K/V / self K/V.
Medians over `--runs` (after one short warm-up per engine); load and export are not timed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import time
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

SPEECH = Path(os.environ.get("EDGESTREAM_SPEECH_DIR")
              or Path(__file__).resolve().parents[2] / "shared" / "data" / "speech")
RATE, TOKENS_PER_S, PARTIAL_MS, PARITY_S = 16000, 3.0, 200, 12
W6 = [[16, 4], [16, 4], [16, 0], [16, 0], [16, 4], [16, 4]]
W14 = [[16, 4]] * 2 + [[16, 0]] * 10 + [[16, 4]] * 2
# published sizes (DESIGN.md section 3); the published checkpoints tie the output projection to
# the token embedding (34 M / 245 M only add up that way); everything else is the config default
# (gelu encoder, SwiGLU decoder, RoPE theta 1e4 with partial factor 0.8, 4096 positions)
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"published": 34e6,
             "encoder": dict(hidden_size=320, intermediate_size=1280, num_hidden_layers=6,
                             num_attention_heads=8, num_key_value_heads=8, sliding_windows=W6),
             "decoder": dict(hidden_size=320, intermediate_size=1280, num_hidden_layers=6,
                             num_attention_heads=8, num_key_value_heads=8)},
    "medium": {"published": 245e6,
               "encoder": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=14,
                               num_attention_heads=12, num_key_value_heads=12,
                               sliding_windows=W14),
               "decoder": dict(hidden_size=640, intermediate_size=2560, num_hidden_layers=14,
                               num_attention_heads=10, num_key_value_heads=10, head_dim=64)},
}
NO_LOOP_GUARD = 10**6  # max_repeats: random weights repeat tokens; decode the full count anyway


@dataclass
class Row:
    """One engine's numbers: per-run totals, pooled chunk latencies."""

    name: str
    push_ms: list[float] = field(default_factory=list)
    enc_rtf: list[float] = field(default_factory=list)
    stream_rtf: list[float] = field(default_factory=list)
    final_ms: list[float] = field(default_factory=list)
    kept: list[float] = field(default_factory=list)


def build_model(size: str, folder: Path, seed: int = 0) -> int:
    """Save a random model of `size` and a word-level tokenizer to `folder`; returns params."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (MoonshineStreamingConfig, MoonshineStreamingForConditionalGeneration,
                              PreTrainedTokenizerFast)

    spec = SIZES[size]
    torch.manual_seed(seed)
    cfg = MoonshineStreamingConfig(encoder_config=spec["encoder"], **spec["decoder"],
                                   vocab_size=32768, max_position_embeddings=4096,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                                   pad_token_id=0, decoder_start_token_id=1)
    model = MoonshineStreamingForConditionalGeneration(cfg).eval()
    model.save_pretrained(folder)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3,
             **{f"w{i}": i for i in range(4, cfg.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def prepare(size: str, work: Path, chunk_ms: int, int8: bool, clip: Path) -> dict[str, Any]:
    """Model folder, fp32 bundle (with parity) and int8 copy under `work/size`."""
    from edgestream.export.build import ExportOptions, export_bundle
    from edgestream.export.quantize import quantize_graphs

    root = work / size
    shutil.rmtree(root, ignore_errors=True)
    params = build_model(size, root / "model")
    t0 = time.perf_counter()
    parity = export_bundle(ExportOptions(str(root / "model"), root / "fp32", chunk_ms=chunk_ms,
                                         parity_audio=(clip,), force=True))
    info = {"params": params, "parity": parity, "export_s": time.perf_counter() - t0,
            "bundles": {"fp32": root / "fp32"}}
    if int8:
        shutil.copytree(root / "fp32", root / "int8")
        data = json.loads((root / "int8" / "manifest.json").read_text())
        data = quantize_graphs(root / "int8", data,
                               ("encoder", "memory", "decoder", "decoder_block"))
        (root / "int8" / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")
        info["bundles"]["int8"] = root / "int8"
    return info


def update_points(chunks: int, chunk: int) -> list[int]:
    """Chunk indices after which the driver re-decodes (its `_since_partial` counter)."""
    points, since = [], 0
    for i in range(chunks):
        since += chunk
        if since >= PARTIAL_MS * RATE // 1000:
            points.append(i)
            since = 0
    return points


def tokens_for(samples: int) -> int:
    return max(1, round(TOKENS_PER_S * samples / RATE))


def stream_once(engine: Any, audio: np.ndarray, rescore: bool, row: Row | None) -> None:
    """One utterance through the engine as the driver runs it; appends to `row` when given."""
    c = engine.chunk
    chunks = audio.size // c
    points, hyp, pushes, kept = set(update_points(chunks, c)), [], [], []
    decode_s = 0.0
    engine.reset()
    for i in range(chunks):
        t0 = time.perf_counter()
        engine.push(audio[i * c:(i + 1) * c])
        pushes.append(time.perf_counter() - t0)
        if i in points:
            t0 = time.perf_counter()
            new = engine.decode(tokens_for((i + 1) * c), NO_LOOP_GUARD,
                                hint=hyp if rescore else (), stop_at_eos=False)
            decode_s += time.perf_counter() - t0
            if hyp:
                same = next((j for j, (a, b) in enumerate(zip(hyp, new)) if a != b),
                            min(len(hyp), len(new)))
                kept.append(same / len(hyp))
            hyp = new
    t0 = time.perf_counter()
    engine.flush()
    engine.decode(tokens_for(chunks * c), NO_LOOP_GUARD, hint=hyp if rescore else (),
                  stop_at_eos=False)
    final = time.perf_counter() - t0
    if row is not None:
        seconds = chunks * c / RATE
        row.push_ms += [1000 * p for p in pushes]
        row.enc_rtf.append(sum(pushes) / seconds)
        row.stream_rtf.append((sum(pushes) + decode_s + final) / seconds)
        row.final_ms.append(1000 * final)
        row.kept.append(statistics.mean(kept) if kept else 1.0)


def eager_runner(model_dir: Path, chunk: int, every: int) -> Callable[[np.ndarray, Row | None],
                                                                       None]:
    """transformers eager re-running the utterance so far at (every `every`-th) update point."""
    import torch
    from transformers import MoonshineStreamingForConditionalGeneration

    model = MoonshineStreamingForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32).eval()

    def generate(samples: np.ndarray) -> float:
        values = torch.from_numpy(samples)[None]
        n = tokens_for(samples.size)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(values, attention_mask=torch.ones_like(values, dtype=torch.long),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1)
        took = time.perf_counter() - t0
        if out.shape[1] != n + 1:
            raise RuntimeError(f"eager generate gave {out.shape[1] - 1} tokens, wanted {n}")
        return took

    def run(audio: np.ndarray, row: Row | None) -> None:
        chunks = audio.size // chunk
        points = update_points(chunks, chunk)
        sampled = points[every // 2::every] or points[-1:]
        timed = [generate(audio[:(i + 1) * chunk]) for i in sampled]
        final = generate(audio[:chunks * chunk])
        if row is not None:
            total = statistics.mean(timed) * len(points) + final
            row.stream_rtf.append(total / (chunks * chunk / RATE))
            row.final_ms.append(1000 * final)
    return run


def state_bytes(engine: Any) -> dict[str, int]:
    parts = {"encoder": 0, "cross_kv": 0, "self_kv": 0, "other": 0}
    for name, buf in engine.states.buffers.items():
        pair = engine.states.pairs[name]
        key = ("cross_kv" if name.startswith("cross_") else "self_kv" if name.startswith("self_")
               else "encoder" if pair.graph == "encoder" else "other")
        parts[key] += buf.nbytes
    return parts


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def bench_size(size: str, args: argparse.Namespace, audio: np.ndarray, clip: Path) -> dict:
    import torch

    from edgestream.runtime.bundle import Bundle
    from edgestream.runtime.moonshine import StreamingEncDecEngine
    from edgestream.runtime.session import SessionConfig

    info = prepare(size, args.work, args.chunk_ms, args.int8, clip)
    p = info["parity"]
    print(f"[{size}] {info['params'] / 1e6:.1f} M parameters (published "
          f"{SIZES[size]['published'] / 1e6:.0f} M, {100 * (info['params'] / SIZES[size]['published'] - 1):+.1f} %); "
          f"export {info['export_s']:.0f} s; parity on {PARITY_S} s of two_cities.wav: passed "
          f"{p['passed']}, identical tokens {p['identical_clips']}/{len(p['clips'])} "
          f"({p['clips'][0]['tokens']} tokens), max encoder diff {p['max_encoder_diff']:.2e}, "
          f"max logit diff {p['max_logit_diff']:.2e}, block {p['max_block_logit_diff']:.2e}",
          flush=True)
    torch.set_num_threads(args.threads)
    cfg = SessionConfig(provider="cpu", threads=args.threads)
    engines, rows, runners = {}, {}, {}
    for prec, folder in info["bundles"].items():
        engines[prec] = StreamingEncDecEngine(Bundle.open(folder, cfg))
        for mode in ("rescored", "naive"):
            name = f"bundle {prec} {mode}"
            rows[name] = Row(name)
            runners[name] = (lambda a, r, e=engines[prec], m=mode:
                             stream_once(e, a, m == "rescored", r))
    chunk = engines["fp32"].chunk
    rows["transformers eager"] = Row("transformers eager")
    runners["transformers eager"] = eager_runner(args.work / size / "model", chunk,
                                                 args.eager_every)
    names = list(runners)
    for name in names:  # warm-up, untimed
        runners[name](audio[: RATE], None)
    for rep in range(args.runs):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            runners[name](audio, rows[name])
            print(f"  run {rep + 1} {name}: {rows[name].stream_rtf[-1]:.3f} s/s", flush=True)

    secs = audio.size // chunk * chunk / RATE
    points = update_points(audio.size // chunk, chunk)
    eager = statistics.median(rows["transformers eager"].stream_rtf)
    out_rows = []
    print(f"\n{size}: {secs:.1f} s audio, {args.chunk_ms} ms chunks, {len(points)} partial "
          f"updates (every {(points[1] - points[0]) * args.chunk_ms} ms), "
          f"{TOKENS_PER_S} tokens/s ({tokens_for(audio.size // chunk * chunk)} at the end); "
          f"median of {args.runs} runs, {args.threads} threads")
    print(f"{'engine':<24}{'push p50':>9}{'p95':>7}{'p99':>7}{'enc RTF':>9}{'stream RTF':>11}"
          f"{'EoS ms':>9}{'vs eager':>10}{'hint kept':>10}")
    for r in rows.values():
        med = {k: statistics.median(getattr(r, k)) if getattr(r, k) else float("nan")
               for k in ("enc_rtf", "stream_rtf", "final_ms", "kept")}
        row = dict(engine=r.name, push_p50_ms=pct(r.push_ms, 50), push_p95_ms=pct(r.push_ms, 95),
                   push_p99_ms=pct(r.push_ms, 99), **med, compute_ratio_vs_eager=eager
                   / med["stream_rtf"], runs=asdict(r) | {"push_ms": None})
        out_rows.append(row)
        print(f"{r.name:<24}{row['push_p50_ms']:>9.2f}{row['push_p95_ms']:>7.2f}"
              f"{row['push_p99_ms']:>7.2f}{med['enc_rtf']:>9.3f}{med['stream_rtf']:>11.3f}"
              f"{med['final_ms']:>9.1f}{row['compute_ratio_vs_eager']:>9.1f}x"
              f"{100 * med['kept']:>9.0f}%")
    timed = len(points[args.eager_every // 2::args.eager_every])
    print(f"eager: timed {timed} of {len(points)} update points (every {args.eager_every}th) "
          "scaled to all, plus the final run on the whole utterance (its EoS)")
    states = state_bytes(engines["fp32"])
    m = engines["fp32"].bundle.manifest
    print(f"state per stream: {sum(states.values()) / 1e6:.1f} MB = encoder "
          f"{states['encoder'] / 1e6:.2f} + cross K/V {states['cross_kv'] / 1e6:.1f} "
          f"({m.extra['max_memory_frames']} rows) + self K/V {states['self_kv'] / 1e6:.1f} "
          f"({m.decoding.max_tokens} tokens) + VAD {states['other'] / 1e3:.1f} kB")
    if size == "tiny":
        for r in out_rows[:-1]:
            if r["engine"].endswith("rescored"):
                print(f"targets {r['engine']}: encoder RTF {r['enc_rtf']:.3f} (<= 0.05), EoS "
                      f"{r['final_ms']:.0f} ms (<= 50), {r['compute_ratio_vs_eager']:.1f}x less "
                      f"compute than eager (>= 10)")
    return dict(size=size, params=info["params"], parity=p, export_s=info["export_s"],
                audio_s=secs, updates=len(points), eager_timed_points=timed,
                state_bytes=states, rows=out_rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgestream.export.bench_moonshine",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["tiny"])
    ap.add_argument("--chunk-ms", type=int, default=80)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--int8", action="store_true", help="also an int8 bundle (fp32 kept)")
    ap.add_argument("--eager-every", type=int, default=5,
                    help="time eager on every Nth update point, scaled (default 5)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgestream-bench-moonshine"))
    ap.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    if min(args.runs, args.threads, args.eager_every) < 1:
        ap.error("--runs, --threads and --eager-every must be at least 1")

    import onnxruntime
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    from edgestream.runtime.wav import read_wav, to_mono

    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    load = os.getloadavg()
    machine = dict(cpu_count=os.cpu_count(), onnxruntime=onnxruntime.__version__,
                   torch=torch.__version__, transformers=transformers.__version__,
                   numpy=np.__version__, loadavg_start=load)
    print(f"machine: cpu_count {os.cpu_count()}, onnxruntime {onnxruntime.__version__}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}, numpy "
          f"{np.__version__}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
          flush=True)
    wav = read_wav(SPEECH / "two_cities.wav")
    full = to_mono(wav.samples).astype(np.float32)
    if wav.sample_rate != RATE or full.size < max(args.seconds, PARITY_S) * RATE:
        ap.error("two_cities.wav must be 16 kHz and long enough")
    args.work.mkdir(parents=True, exist_ok=True)
    clip = args.work / f"two_cities_{PARITY_S}s.wav"
    with wave.open(str(clip), "wb") as w:  # the parity slice as a 16-bit file
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(RATE)
        w.writeframes(np.clip(np.round(full[: PARITY_S * RATE] * 32768), -32768, 32767)
                      .astype("<i2").tobytes())
    audio = full[: int(args.seconds * RATE)]
    results = [bench_size(size, args, audio, clip) for size in args.sizes]
    if args.json:
        args.json.write_text(json.dumps(dict(machine=machine, args={
            k: str(v) for k, v in vars(args).items()}, sizes=results), indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
