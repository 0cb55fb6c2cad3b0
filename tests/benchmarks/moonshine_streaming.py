"""moonshine_streaming on CPU at the published sizes, random weights: our bundle vs transformers.

Per size (DESIGN.md section 3): a random model with a 32768-word tokenizer, exported by
`export_bundle` (parity on 12 s of two_cities.wav, printed), with --int8 also a quantized copy. On
the first --seconds of two_cities.wav, engines rotated per run, after an untimed 1 s warm-up each:
1. encoder path: `push` (encoder + memory) per chunk, p50/p95/p99 ms, push time / audio time;
2. the stream as the driver runs it (push per chunk, a partial once 200 ms arrived since the last,
   i.e. every 240 ms at 80 ms chunks, then flush + final) in compute seconds per audio second.
   Random weights never say eos: each decode yields round(3 tokens/s x audio so far) tokens
   (`stop_at_eos=False`), re-scoring the last partial via the decoder's K-token pass ("rescored") or from
   scratch (`hint=()`, "naive"). "hint kept": share of a partial that the next one kept; random
   weights keep far less than trained ones, so "stable" re-scores a hint that is the result's
   prefix of the last partial's length (found by an untimed decode): the best case. int8 block
   and step logits differ (activations quantized per call), so there a hint can fail anyway;
3. end of speech to final: flush + final decode (re-scored from the last partial), ms;
4. transformers eager without streaming: `generate` on the utterance so far (encoder over all audio,
   KV-cached greedy of the same token count) at every --eager-every-th update point, scaled to all
   points, plus once on the whole utterance (its end-of-speech time);
5. state bytes per stream (every StateStore buffer): encoder / cross K/V / self K/V.
Medians over --runs; building, export and loading are not timed. "others CPU": the largest share
of all CPUs that other processes used while an engine was timed (from /proc/stat): it flags runs
disturbed by the machine's other work, which slows torch's threads far more than onnxruntime's.
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
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech"  # the repository's real clips
RATE, TOKENS_PER_S, PARTIAL_MS, PARITY_S = 16000, 3.0, 200, 12
NO_LOOP_GUARD = 10**6  # max_repeats: random weights repeat tokens; decode the full count anyway


def _dims(width: int, layers: int, heads: int, **kw: Any) -> dict[str, Any]:
    return dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, **kw)


# Published sizes (DESIGN.md section 3). Their 34 M / 245 M add up only with the output projection
# tied to the token embedding; the rest are MoonshineStreamingConfig defaults (gelu encoder, SwiGLU
# decoder, RoPE theta 1e4 with partial factor 0.8, 4096 positions, vocab 32768). The medium
# encoder's head count is not in DESIGN.md: 12 (head dim 64) is assumed; the size ignores it.
SIZES: dict[str, tuple[float, dict[str, Any], dict[str, Any]]] = {
    "tiny": (34e6, _dims(320, 6, 8, sliding_windows=[[16, 4]] * 2 + [[16, 0]] * 2 + [[16, 4]] * 2),
             _dims(320, 6, 8)),
    "medium": (245e6, _dims(768, 14, 12, sliding_windows=[[16, 4]] * 2 + [[16, 0]] * 10
                            + [[16, 4]] * 2), _dims(640, 14, 10, head_dim=64)),
}


Row = dict[str, list[float]]  # per-run push_ms (pooled), enc_rtf, stream_rtf, final_ms, kept


def prepare(size: str, root: Path, chunk_ms: int, int8: bool, clip: Path) -> dict[str, Any]:
    """Random model + tokenizer in root/model, bundles in root/fp32 (parity) and root/int8."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (MoonshineStreamingConfig, MoonshineStreamingForConditionalGeneration,
                              PreTrainedTokenizerFast)

    from edgestream.export.build import ExportOptions, export_bundle
    from edgestream.export.quantize import quantize_graphs

    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(0)
    cfg = MoonshineStreamingConfig(
        encoder_config=SIZES[size][1], **SIZES[size][2], vocab_size=32768,
        max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, decoder_start_token_id=1)
    model = MoonshineStreamingForConditionalGeneration(cfg).eval()
    model.save_pretrained(root / "model")
    params = sum(p.numel() for p in model.parameters())
    del model
    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 32768)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(root / "model")
    t0 = time.perf_counter()
    parity = export_bundle(ExportOptions(str(root / "model"), root / "fp32", chunk_ms=chunk_ms,
                                         parity_audio=(clip,), force=True))
    info = dict(params=params, parity=parity, export_s=time.perf_counter() - t0,
                bundles={"fp32": root / "fp32"})
    # int8: every model graph; int8enc: the audio side only, decoders fp32 (exact re-scoring)
    for name, graphs in (("int8", ("encoder", "memory", "decoder")),
                         ("int8enc", ("encoder", "memory"))) if int8 else ():
        shutil.copytree(root / "fp32", root / name, dirs_exist_ok=True)
        data = quantize_graphs(root / name, json.loads((root / "fp32/manifest.json").read_text()),
                               graphs, per_channel=True)
        (root / name / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")
        info["bundles"][name] = root / name
    return info


def update_points(chunks: int, chunk: int) -> list[int]:
    """Chunk indices after which the driver re-decodes (its `_since_partial` counter)."""
    every = -(-PARTIAL_MS * RATE // 1000 // chunk)
    return [i for i in range(chunks) if (i + 1) % every == 0]


def tokens_for(samples: int) -> int:
    return max(1, round(TOKENS_PER_S * samples / RATE))


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


def stream_once(engine: Any, audio: np.ndarray, mode: str, row: Row | None) -> None:
    """One utterance through the engine as the driver runs it; recorded in `row` when given.
    `mode`: "rescored" (hint = last partial), "naive" (no hint), "stable" (hint = the first
    len(last partial) tokens of the result, found by an untimed re-scored decode: the best case,
    a trained model whose partials only grow)."""
    c = engine.chunk
    chunks = audio.size // c
    points, hyp, pushes, kept, decode_s = set(update_points(chunks, c)), [], [], [], 0.0

    def decode(n: int, last: list[int]) -> tuple[list[int], float]:
        if mode == "stable":
            last = engine.decode(n, NO_LOOP_GUARD, hint=last, stop_at_eos=False)[: len(last)]
        return _timed(lambda: engine.decode(n, NO_LOOP_GUARD, stop_at_eos=False,
                                            hint=() if mode == "naive" else last))

    engine.reset()
    for i in range(chunks):
        pushes.append(_timed(engine.push, audio[i * c:(i + 1) * c])[1])
        if i in points:
            new, took = decode(tokens_for((i + 1) * c), hyp)
            decode_s += took
            if hyp:
                same = next((j for j, (a, b) in enumerate(zip(hyp, new)) if a != b), len(hyp))
                kept.append(same / len(hyp))
            hyp = new
    final = _timed(engine.flush)[1] + decode(tokens_for(chunks * c), hyp)[1]
    if row is not None:
        seconds = chunks * c / RATE
        row["push_ms"] += [1000 * p for p in pushes]
        row["enc_rtf"].append(sum(pushes) / seconds)
        row["stream_rtf"].append((sum(pushes) + decode_s + final) / seconds)
        row["final_ms"].append(1000 * final)
        row["kept"].append(statistics.mean(kept) if kept else 1.0)


def busy_seconds() -> tuple[float, float]:
    """CPU seconds used so far by all processes (/proc/stat) and by this one."""
    with open("/proc/stat", encoding="ascii") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    own = os.times()
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def eager_runner(model_dir: Path, chunk: int, every: int
                 ) -> Callable[[np.ndarray, Row | None], None]:
    """transformers eager re-running the utterance so far at every `every`-th update point."""
    import torch
    from transformers import MoonshineStreamingForConditionalGeneration

    model = MoonshineStreamingForConditionalGeneration.from_pretrained(model_dir).eval()

    def generate(samples: np.ndarray) -> float:
        values, n = torch.from_numpy(samples)[None], tokens_for(samples.size)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(values, attention_mask=torch.ones_like(values, dtype=torch.long),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1)
        if out.shape[1] != n + 1:  # the start token + n
            raise RuntimeError(f"eager generate gave {out.shape[1] - 1} tokens, wanted {n}")
        return time.perf_counter() - t0

    def run(audio: np.ndarray, row: Row | None) -> None:
        chunks = audio.size // chunk
        points = update_points(chunks, chunk)
        timed = [generate(audio[:(i + 1) * chunk]) for i in points[every // 2::every]]
        final = generate(audio[:chunks * chunk])
        if row is not None:
            total = (statistics.mean(timed) * len(points) if timed else 0.0) + final
            row["stream_rtf"].append(total / (chunks * chunk / RATE))
            row["final_ms"].append(1000 * final)
    return run


def state_bytes(engine: Any) -> dict[str, int]:
    parts = dict.fromkeys(("encoder", "cross_kv", "self_kv", "other"), 0)
    for name, buf in engine.states.buffers.items():
        kind = next((k for k in ("cross", "self") if name.startswith(k + "_")), "")
        parts[f"{kind}_kv" if kind else "encoder" if engine.states.pairs[name].graph == "encoder"
              else "other"] += buf.nbytes
    return parts


COLUMNS = (("push p50", 9, ".2f"), ("p95", 7, ".2f"), ("p99", 7, ".2f"), ("enc RTF", 9, ".3f"),
           ("stream RTF", 11, ".3f"), ("EoS ms", 8, ".1f"), ("x eager", 9, ".1f"),
           ("hint kept", 10, ".2f"), ("others CPU", 11, ".0%"))


def summarize(name: str, r: Row, eager: float) -> dict[str, Any]:
    """Medians over runs (percentiles over pooled chunks); NaN where an engine has no such row."""
    def med(key: str) -> float:
        return statistics.median(r[key]) if r[key] else float("nan")
    pct = [float(np.percentile(r["push_ms"], q)) if r["push_ms"] else float("nan")
           for q in (50, 95, 99)]
    return dict(engine=name, push_p50_ms=pct[0], push_p95_ms=pct[1], push_p99_ms=pct[2],
                enc_rtf=med("enc_rtf"), stream_rtf=med("stream_rtf"), final_ms=med("final_ms"),
                less_compute_than_eager=eager / med("stream_rtf"), kept=med("kept"),
                others_cpu_max=max(r["others_cpu"]),
                runs={k: v for k, v in r.items() if k != "push_ms"})


def run_engines(runners: dict[str, Callable[[np.ndarray, Row | None], None]], audio: np.ndarray,
                runs: int) -> dict[str, Row]:
    """Warm every engine up on 1 s, then `runs` passes over `audio`, the order rotated per pass;
    records what share of the CPUs the other processes on this machine took meanwhile."""
    rows: dict[str, Row] = {name: defaultdict(list) for name in runners}
    names = list(runners)
    for name in names:
        runners[name](audio[:RATE], None)
    for rep in range(runs):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            (all0, own0), t0 = busy_seconds(), time.perf_counter()
            runners[name](audio, rows[name])
            (all1, own1), wall = busy_seconds(), time.perf_counter() - t0
            rows[name]["others_cpu"].append(max(0.0, (all1 - all0 - own1 + own0)
                                                / (wall * (os.cpu_count() or 1))))
            print(f"  run {rep + 1} {name}: {rows[name]['stream_rtf'][-1]:.3f} s compute per "
                  "audio s", flush=True)
    return rows


def bench_size(size: str, args: argparse.Namespace, audio: np.ndarray, clip: Path) -> dict:
    import torch

    from edgestream.runtime.bundle import Bundle
    from edgestream.runtime.families.moonshine.engine import StreamingEncDecEngine
    from edgestream.runtime.session import SessionConfig

    info = prepare(size, args.work / size, args.chunk_ms, args.int8, clip)
    p, params, published = info["parity"], info["params"], SIZES[size][0]
    print(f"[{size}] {params / 1e6:.1f} M parameters (published {published / 1e6:.0f} M, "
          f"{100 * (params / published - 1):+.1f} %), export {info['export_s']:.0f} s; parity on "
          f"{PARITY_S} s of two_cities.wav: passed {p['passed']}, identical tokens "
          f"{p['identical_clips']}/{len(p['clips'])} ({p['clips'][0]['tokens']} tokens), max diff "
          f"encoder {p['max_encoder_diff']:.1e}, logits {p['max_logit_diff']:.1e}, block logits "
          f"{p['max_block_logit_diff']:.1e}", flush=True)
    torch.set_num_threads(args.threads)
    cfg = SessionConfig(provider="cpu", threads=args.threads)
    engines, runners = {}, {}
    for prec, folder in info["bundles"].items():
        engines[prec] = engine = StreamingEncDecEngine(Bundle.open(folder, cfg))
        for mode in ("rescored", "stable", "naive"):
            runners[f"bundle {prec} {mode}"] = (
                lambda a, r, e=engine, m=mode: stream_once(e, a, m, r))
    chunk = engines["fp32"].chunk
    runners["transformers eager"] = eager_runner(args.work / size / "model", chunk,
                                                 args.eager_every)
    rows = run_engines(runners, audio, args.runs)
    chunks = audio.size // chunk
    secs, points = chunks * chunk / RATE, update_points(chunks, chunk)
    timed = len(points[args.eager_every // 2::args.eager_every])
    eager = statistics.median(rows["transformers eager"]["stream_rtf"])
    out = [summarize(name, r, eager) for name, r in rows.items()]
    print(f"\n{size}: {secs:.1f} s audio, {args.chunk_ms} ms chunks, {len(points)} partials "
          f"(every {(points[1] - points[0]) * args.chunk_ms} ms), {TOKENS_PER_S:g} tokens/s "
          f"({tokens_for(chunks * chunk)} at the end); median of {args.runs} runs, "
          f"{args.threads} threads; load average now {os.getloadavg()[0]:.2f}")
    print(f"{'engine':<24}" + "".join(f"{c:>{w}}" for c, w, _ in COLUMNS))
    for row in out:
        values = list(row.values())[1:10]
        print(f"{row['engine']:<24}" + "".join(
            f"{'-':>{w}}" if v != v else f"{v:>{w}{f}}" for v, (_, w, f) in zip(values, COLUMNS)))
    print(f"eager: timed at {timed} of {len(points)} update points (every {args.eager_every}th, "
          "scaled to all) plus once on the whole utterance (its EoS)")
    states, m = state_bytes(engines["fp32"]), engines["fp32"].bundle.manifest
    print(f"state per stream: {sum(states.values()) / 1e6:.1f} MB = encoder "
          f"{states['encoder'] / 1e6:.2f} + cross K/V {states['cross_kv'] / 1e6:.1f} "
          f"({m.extra['max_memory_frames']} rows) + self K/V {states['self_kv'] / 1e6:.1f} "
          f"({m.decoding.max_tokens} tokens) + VAD {states['other'] / 1e3:.1f} kB")
    for row in out if size == "tiny" else []:
        if row["engine"].endswith(("rescored", "stable")):
            print(f"target check, {row['engine']}: encoder RTF {row['enc_rtf']:.3f} (<= 0.05), "
                  f"EoS {row['final_ms']:.0f} ms (<= 50), {row['less_compute_than_eager']:.1f}x "
                  "less compute than eager (>= 10)")
    return dict(size=size, params=params, parity=p, export_s=info["export_s"], audio_s=secs,
                updates=len(points), eager_timed_points=timed, state_bytes=states, rows=out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tests/benchmarks/moonshine_streaming.py",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["tiny"])
    for flag, kind, default in (("--chunk-ms", int, 80), ("--seconds", float, 10.0),
                                ("--runs", int, 5), ("--threads", int, 2),
                                ("--eager-every", int, 5)):
        ap.add_argument(flag, type=kind, default=default)
    ap.add_argument("--int8", action="store_true", help="also an int8 bundle (fp32 kept)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgestream-bench-moonshine"))
    ap.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    if min(args.runs, args.threads, args.eager_every, args.seconds) < 1:
        ap.error("--runs, --threads, --eager-every and --seconds must be at least 1")

    import onnxruntime
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    from edgestream.runtime.audio.wav import read_wav, to_mono

    logging.basicConfig(level=logging.ERROR)  # quantize_dynamic's advice, exporter chatter
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    machine = dict(cpu_count=os.cpu_count(), onnxruntime=onnxruntime.__version__,
                   torch=torch.__version__, transformers=transformers.__version__,
                   numpy=np.__version__, load_avg=[round(x, 2) for x in os.getloadavg()])
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), flush=True)
    wav = read_wav(SPEECH / "two_cities.wav")
    full = to_mono(wav.samples).astype(np.float32)
    if wav.sample_rate != RATE or full.size < max(args.seconds, PARITY_S) * RATE:
        ap.error(f"{SPEECH}/two_cities.wav: need 16 kHz, {max(args.seconds, PARITY_S)} s")
    args.work.mkdir(parents=True, exist_ok=True)
    clip = args.work / f"two_cities_{PARITY_S}s.wav"
    with wave.open(str(clip), "wb") as w:  # the parity slice, 16-bit like its source
        w.setparams((1, 2, RATE, 0, "NONE", "not compressed"))
        w.writeframes((full[: PARITY_S * RATE] * 32768).round().clip(-32768, 32767)
                      .astype("<i2").tobytes())
    audio = full[: int(args.seconds * RATE)]
    results = [bench_size(size, args, audio, clip) for size in args.sizes]
    if args.json:
        args.json.write_text(json.dumps(dict(machine=machine, args=vars(args), sizes=results),
                                        indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
