"""Whisper decoder-step ladder, side by side in one run (issue 8): what each execution level of the
runtime costs per one-token decoder step, against transformers eager on the same device.

Rows (median ms per step over `--steps` steps, after `--warmup` steps; ratio to eager):
  transformers eager            torch, KV cache, on CUDA when torch has it, else the CPU
  ort cpu, numpy feeds          the host path on the CPU provider (always: the CPU baseline)
  ort cpu, bound state          device-state path (IO binding) on the CPU provider
  ort cuda, numpy feeds         every K/V buffer uploaded per step, logits copied back
  ort cuda, bound state         state resident on the GPU, IO binding
  ort cuda, bound + greedy head only the chosen id and its log-probability leave the GPU
  ort cuda, bound + cuda graph  + the step replayed as a captured CUDA graph
  ort cuda fp16, bound + graph  + fp16 weights and compute (inputs/outputs stay fp32)
A row that cannot run here says why (e.g. no CUDAExecutionProvider) instead of a number.

Weights: random at Whisper tiny.en's published shape (d_model 384, 4+4 layers, 6 heads, vocab
51864, 448 positions; `--model base` for base.en's shape), built on this machine: no download,
nothing to transfer. A synthetic tokenizer carries the tiny.en special-token ids. `--bundle DIR`
uses an exported bundle instead (e.g. real weights from `edgestream export
builtin:whisper-tiny.en`). Agreement: the bound paths' logits are compared with the CPU host
path's on the same step (fp32: within 1e-3 relative; printed).

    .venv/bin/python tests/benchmarks/gpu_steps.py [--steps 200] [--rounds 5] [--bundle DIR]
        [--model tiny|base] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

SHAPES = {"tiny": dict(d_model=384, layers=4, heads=6, ffn=1536),
          "base": dict(d_model=512, layers=6, heads=8, ffn=2048)}
# tiny.en / base.en special-token ids (English-only vocabulary, 51864 tokens)
SPECIALS = {"<|endoftext|>": 50256, "<|startoftranscript|>": 50257, "<|translate|>": 50357,
            "<|transcribe|>": 50358, "<|startoflm|>": 50359, "<|startofprev|>": 50360,
            "<|nocaptions|>": 50361, "<|notimestamps|>": 50362}
VOCAB = 51864


def build_bundle(model: str, out: Path, fp16: bool = False) -> Path:
    """A whisper bundle of random weights at the published shape (export side: torch)."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    from edgestream.export.whisper.recipe import WhisperParts, export_whisper_graphs

    s = SHAPES[model]
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=VOCAB, d_model=s["d_model"], encoder_layers=s["layers"],
                        decoder_layers=s["layers"], encoder_attention_heads=s["heads"],
                        decoder_attention_heads=s["heads"], encoder_ffn_dim=s["ffn"],
                        decoder_ffn_dim=s["ffn"], max_target_positions=448,
                        decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256,
                        bos_token_id=50256)
    net = WhisperForConditionalGeneration(cfg).eval()
    net.generation_config = GenerationConfig(decoder_start_token_id=50257, eos_token_id=50256,
                                             suppress_tokens=[1, 2, 7],
                                             begin_suppress_tokens=[220, 50256])
    vocab = {f"t{i}": i for i in range(VOCAB)}
    for text, i in SPECIALS.items():
        vocab.pop(f"t{i}")
        vocab[text] = i
    tokenizer_json = Tokenizer(models.WordLevel(vocab, unk_token="t0")).to_str()
    special = {"sot": 50257, "eot": 50256, "no_timestamps": 50362, "timestamp_begin": 50363,
               "sot_prev": 50360, "transcribe": 50358, "translate": 50357}
    parts = WhisperParts(net, tokenizer_json, special, (50257, 50362), (1, 2, 7), (220, 50256),
                         {"id": f"random:whisper-{model}.en-shape", "kind": "random"}, {})
    out.mkdir(parents=True, exist_ok=True)
    manifest = export_whisper_graphs(parts, out)
    if fp16:
        from edgestream.export.quantize import quantize_file, refresh_entry

        for entry in manifest["graphs"]:
            quantize_file(out / entry["file"], "fp16")
            refresh_entry(entry, out)
            entry["precision"] = "fp16"
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


Step = Callable[[int], Any]


def timed_rounds(steps: dict[str, Step], warmup: int, total: int, rounds: int,
                 start: int = 16) -> dict[str, float]:
    """Median ms per step of every row, the rows interleaved in `rounds` (rotating their order)
    so that machine load affects all alike."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for step in steps.values():
        for i in range(warmup):
            step(start + i % 64)
    per_round = max(1, total // rounds)
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            step = steps[name]
            for i in range(per_round):
                t = time.perf_counter()
                step(start + i % 64)
                times[name].append((time.perf_counter() - t) * 1000.0)
    return {k: statistics.median(v) for k, v in times.items()}


def eager_step(model: str) -> tuple[str, Step]:
    """transformers eager one-token step with a KV cache of 16 rows, on CUDA when torch has it."""
    import torch
    from transformers import DynamicCache, EncoderDecoderCache, WhisperConfig
    from transformers import WhisperForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = SHAPES[model]
    cfg = WhisperConfig(vocab_size=VOCAB, d_model=s["d_model"], encoder_layers=s["layers"],
                        decoder_layers=s["layers"], encoder_attention_heads=s["heads"],
                        decoder_attention_heads=s["heads"], encoder_ffn_dim=s["ffn"],
                        decoder_ffn_dim=s["ffn"], max_target_positions=448)
    torch.manual_seed(0)
    net = WhisperForConditionalGeneration(cfg).eval().to(device)
    enc = torch.randn(1, 1500, s["d_model"], device=device)
    with torch.no_grad():
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        out = net(encoder_outputs=(enc,), decoder_input_ids=torch.tensor([[50257] * 16],
                  device=device), past_key_values=cache, use_cache=True)
    cache = out.past_key_values
    token = torch.tensor([[50257]], device=device)

    def step(_: int) -> None:
        with torch.no_grad():
            net(encoder_outputs=(enc,), decoder_input_ids=token, past_key_values=cache,
                use_cache=True)
        cache.self_attention_cache.crop(-1)  # drop the new row: every step is at 16
        if device == "cuda":
            torch.cuda.synchronize()

    return f"transformers eager ({device})", step


def ort_step(bundle: Path, provider: str, execution: str, captured: int, head: bool,
             threads: int) -> tuple[Step, Callable[[], np.ndarray], str]:
    """A decoder step of the runtime's Whisper engine (and a probe for its logits)."""
    from edgestream.runtime.bundle import Bundle
    from edgestream.runtime.families.whisper.engine import WhisperEngine
    from edgestream.runtime.session import SessionConfig

    engine = WhisperEngine(Bundle.open(bundle, SessionConfig(provider, threads, {}, execution,
                                                             captured)))
    rng = np.random.default_rng(0)
    engine.encode(rng.standard_normal(16000 * 5).astype(np.float32) * 0.1)
    for pos in range(16):
        engine.step(50257, pos)
    if head and not engine.has_head:
        raise RuntimeError("this bundle has no greedy head (exported before issue 8)")
    step: Step = (lambda pos: engine.step_choice(50257, pos, False)) if head else \
        (lambda pos: engine.step(50257, pos))
    note = engine.decoder.capture.log_line() if captured else ""
    return step, lambda: engine.step(50257, 16), note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--bundle", type=Path, help="an exported Whisper bundle instead of random "
                                                "weights (its CPU/CUDA rows; no fp16 row)")
    ap.add_argument("--steps", type=int, default=200, help="timed steps per row")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: default)")
    args = ap.parse_args()
    import onnxruntime as ort

    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in available
    load_before = os.getloadavg()[0]
    print(f"onnxruntime {ort.__version__}, providers: {', '.join(available)}")
    tmp = Path(tempfile.mkdtemp(prefix="gpu-steps-"))
    bundle = args.bundle or build_bundle(args.model, tmp / "fp32")
    why = "skipped: this onnxruntime offers no CUDAExecutionProvider (install onnxruntime-gpu)"
    fp16_bundle, why16 = None, why
    if cuda and args.bundle is None:
        try:
            fp16_bundle = build_bundle(args.model, tmp / "fp16", fp16=True)
        except Exception as e:  # the converter's own exception types
            why16 = f"failed to build the fp16 bundle: {e}"
    plan = [("ort cpu, numpy feeds", bundle, "cpu", "host", 0, False),
            ("ort cpu, bound state", bundle, "cpu", "bound", 0, False),
            ("ort cpu, bound + greedy head", bundle, "cpu", "bound", 0, True),
            ("ort cuda, numpy feeds", bundle, "cuda", "host", 0, False),
            ("ort cuda, bound state", bundle, "cuda", "bound", 0, False),
            ("ort cuda, bound + greedy head", bundle, "cuda", "bound", 0, True),
            ("ort cuda, bound + cuda graph", bundle, "cuda", "bound", 1, True),
            ("ort cuda fp16, bound + graph", fp16_bundle, "cuda", "bound", 1, True)]
    steps: dict[str, Step] = {}
    skipped: dict[str, str] = {}
    probes: dict[str, Callable[[], np.ndarray]] = {}
    notes: list[str] = []
    eager_name, steps_eager = eager_step(args.model)
    steps[eager_name] = steps_eager
    for label, bundle_dir, provider, execution, captured, head in plan:
        if provider == "cuda" and not cuda:
            skipped[label] = why
        elif bundle_dir is None:
            skipped[label] = "skipped: --bundle given" if args.bundle else why16
        else:
            try:
                steps[label], probes[label], note = ort_step(bundle_dir, provider, execution,
                                                             captured, head, args.threads)
                if note:
                    notes.append(f"{label}: {note}")
            except Exception as e:  # a GPU row that fails says why; the others still run
                skipped[label] = f"failed: {type(e).__name__}: {str(e)[:160]}"
    medians = timed_rounds(steps, args.warmup, args.steps, args.rounds)
    eager_ms, base_ms = medians[eager_name], medians["ort cpu, numpy feeds"]
    print(f"\nWhisper {args.bundle or args.model + '.en-shaped random weights'}: one-token "
          f"decoder step after 16 cached tokens, median of {args.steps} steps per row in "
          f"{args.rounds} interleaved rounds (after {args.warmup} warm-up steps); load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"{'row':<34} {'ms/step':>9} {'x eager':>8} {'x ort cpu':>10}")
    for label in [eager_name] + [p[0] for p in plan]:
        if label in medians:
            ms = medians[label]
            print(f"{label:<34} {ms:>9.3f} {eager_ms / ms:>7.2f}x {base_ms / ms:>9.2f}x")
        else:
            print(f"{label:<34} {skipped[label]}")
    for note in notes:  # whether the "cuda graph" rows really replay a captured graph
        print(note)
    ref = probes["ort cpu, numpy feeds"]()
    print("\nagreement with the CPU host path (same step): max |diff| / max |logit|, argmax")
    for label, probe in probes.items():
        logits = probe()
        rel = float(np.abs(logits - ref).max() / max(1e-9, float(np.abs(ref).max())))
        same = int(np.argmax(logits)) == int(np.argmax(ref))
        print(f"  {label:<34} {rel:.2e}  {'same' if same else 'DIFFERENT'}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
