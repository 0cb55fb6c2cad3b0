"""The responder's figures (issue 10), one run, same clips, same bundles, medians.

Run: `.venv/bin/python tests/benchmarks/responder.py --lm LM_BUNDLE [--asr ASR_BUNDLE]
[--runs N] [--sections A B C D]`. Without --asr, builtin:whisper-tiny.en is exported once into
--work. LM_BUNDLE: `edgestream export builtin:smollm2-135m-instruct -o DIR`.

A. Compute between the endpoint decision and the first reply token shown, per turn of the human
   clips (one model chunk per feed call; the call that decides the endpoint is the start):
   turn-based baseline (no read-along, no speculative final: final transcript, then prefill the
   turn with the system prompt already cached, then the first token) against the responder with
   and without speculation (both inline, so the compute is on the clock); and from the last voiced
   sample (the recognizer's end of speech to final, endpoint wait included) to the first token.
B. The recognizer does not suffer: the clips paced in real time through the recognizer alone and
   with the threaded responder beside it: step p95 and end of speech to final p50.
C. Decode tokens per second (64 greedy tokens after a chat prompt, median of at least 5
   interleaved runs): tests/benchmarks/lm_decode.py, which also runs on its own.
D. Memory: state bytes per conversation (LM ring KV) and per recognizer stream; resident memory
   (VmRSS, VmHWM) of the whole loop with Whisper tiny.en and the LM loaded after a run; against
   the Orin Nano profile's budget.

The machine this runs on has 2 cores shared with other work: figures are noisy (load printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
SPEECH = HERE.parents[0] / "data" / "speech"
ROOT = HERE.parents[1]
CLIPS = ("beckett", "arctic_a0007", "arctic_a0009", "two_cities")
SYSTEM = "You are a friendly voice assistant. Answer in one or two short sentences."
PROMPT = "Tell me something interesting about the ocean."


def load_clip(name: str) -> np.ndarray:
    from edgestream.runtime.audio.resample import StreamingResampler
    from edgestream.runtime.audio.wav import read_wav, to_mono

    wav = read_wav(SPEECH / f"{name}.wav")
    audio = to_mono(wav.samples)
    if wav.sample_rate != 16000:
        r = StreamingResampler(wav.sample_rate, 16000)
        audio = np.concatenate([r.process(audio), r.flush()])
    return audio


def session_audio() -> np.ndarray:
    """The clips one after another, each followed by 1.5 s of silence (the turn ends)."""
    parts = []
    for c in CLIPS:
        parts += [load_clip(c), np.zeros(24000, np.float32)]
    return np.concatenate(parts)


def med(values: list[float]) -> float:
    return round(float(statistics.median(values)), 2) if values else float("nan")


def rss_mb() -> tuple[float, float]:
    status = Path("/proc/self/status").read_text()
    get = lambda k: float(next(l.split()[1] for l in status.splitlines() if l.startswith(k)))
    return get("VmRSS:") / 1024, get("VmHWM:") / 1024


# -- A. endpoint to first reply token -----------------------------------------------------------
def turn_latencies(asr: Any, lm: Any, mode: str, max_reply: int = 32) -> dict:
    """mode: baseline, responder, responder_nospec. Returns per-turn ms lists."""
    from edgestream.runtime.events.types import Final
    from edgestream.runtime.responder.conversation import Conversation
    from edgestream.runtime.responder.responder import Responder, ResponderOptions

    audio = session_audio()
    chunk = asr.chunk_samples
    after_endpoint, eos = [], []
    if mode == "baseline":
        stream = asr.stream(speculative=False)
        conv = Conversation(lm, SYSTEM, max_reply)
        for i in range(0, audio.size, chunk):
            t0 = time.perf_counter()
            events = stream.feed(audio[i:i + chunk], 16000)
            for e in events:
                if isinstance(e, Final) and e.reason == "endpoint" and e.text.strip():
                    conv.begin_reply(e.text.strip())
                    conv.next_token()
                    after_endpoint.append((time.perf_counter() - t0) * 1000)
                    conv.discard()  # every turn from the cached system prompt
        stats = stream.stats_event().values
    else:
        r = Responder(asr, lm, ResponderOptions(system_prompt=SYSTEM, max_reply_tokens=max_reply,
                                                speculative=mode == "responder",
                                                threaded=False),
                      speculative=mode == "responder")
        starts = {}
        for i in range(0, audio.size, chunk):
            t0 = time.perf_counter()
            events = r.feed(audio[i:i + chunk], 16000)
            for e in events:
                if isinstance(e, Final) and e.reason == "endpoint" and e.text.strip():
                    starts[len(starts)] = t0
        r.finish()
        for rid, t0 in starts.items():
            first = r.worker.first_token_at.get(rid)
            if first is not None:
                after_endpoint.append((first - t0) * 1000)
        stats = r.stream.stats_event().values
    eos_final = stats.get("eos_to_final_ms_p50", float("nan"))
    return {"turns": len(after_endpoint), "after_endpoint_ms": after_endpoint,
            "eos_to_final_ms_p50": eos_final,
            "final_compute_ms_p50": stats.get("final_compute_ms_p50", float("nan"))}


def section_a(asr: Any, lm: Any, runs: int) -> dict:
    out: dict = {}
    for mode in ("baseline", "responder", "responder_nospec"):
        per_run = [turn_latencies(asr, lm, mode) for _ in range(runs)]
        lat = [x for r in per_run for x in r["after_endpoint_ms"]]
        eos = med([r["eos_to_final_ms_p50"] for r in per_run])
        fc = med([r["final_compute_ms_p50"] for r in per_run])
        out[mode] = {"turns_per_run": per_run[0]["turns"], "after_endpoint_ms_p50": med(lat),
                     "after_endpoint_ms_max": round(max(lat), 2) if lat else None,
                     "asr_final_compute_ms_p50": fc,
                     # last voiced sample -> final (endpoint wait + final compute), then the LM
                     "last_voiced_to_first_token_ms_p50": round(eos - fc + med(lat), 1)}
    b, r = out["baseline"]["after_endpoint_ms_p50"], out["responder"]["after_endpoint_ms_p50"]
    out["baseline_over_responder"] = round(b / r, 1) if r else None
    return out


# -- B. the recognizer beside the responder -----------------------------------------------------
def paced_run(asr: Any, lm: Any | None) -> dict:
    from edgestream.runtime.responder.responder import Responder, ResponderOptions

    # three short turns with pauses, paced like a microphone
    audio = np.concatenate([np.concatenate([load_clip(c), np.zeros(24000, np.float32)])
                            for c in CLIPS[:3]])
    stream = asr.stream(live=True) if lm is None else Responder(
        asr, lm, ResponderOptions(system_prompt=SYSTEM, max_reply_tokens=48), live=True)
    block = 1024
    start = time.perf_counter()
    for i in range(0, audio.size, block):
        stream.feed(audio[i:i + block], 16000)
        due = start + (i + block) / 16000
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    stream.finish()
    v = stream.stats_event().values
    return {"step_ms_p95": v["step_ms_p95"], "eos_to_final_ms_p50": v.get("eos_to_final_ms_p50")}


def section_b(asr: Any, lm: Any, runs: int) -> dict:
    alone = [paced_run(asr, None) for _ in range(runs)]
    beside = [paced_run(asr, lm) for _ in range(runs)]
    out = {}
    for key in ("step_ms_p95", "eos_to_final_ms_p50"):
        a, b = med([r[key] for r in alone]), med([r[key] for r in beside])
        out[key] = {"alone": a, "with_responder": b, "ratio": round(b / a, 2) if a else None}
    return out


# -- C. decode tokens per second: lm_decode.py (every engine, interleaved runs) -----------------
def section_c(lms: dict[str, Any], runs: int, work: Path) -> dict:
    from lm_decode import engines, measure

    return measure(engines(lms, work, ["int8"]), max(runs, 5))


# -- D. memory ----------------------------------------------------------------------------------
def section_d(asr: Any, lm: Any) -> dict:
    from edgestream.runtime.responder.responder import Responder, ResponderOptions

    r = Responder(asr, lm, ResponderOptions(system_prompt=SYSTEM, threaded=False))
    audio = session_audio()
    for i in range(0, audio.size, 4096):
        r.feed(audio[i:i + 4096], 16000)
    r.finish()
    rss, peak = rss_mb()
    budget = tomllib.loads((ROOT / "devices" / "profiles" / "jetson-orin-nano.toml")
                           .read_text())["memory"]["budget_mb"]
    return {"lm_state_mb": round(r.conv.state_bytes / 1e6, 1),
            "asr_state_mb": round(r.stream.state_bytes / 1e6, 1),
            "rss_mb": round(rss), "peak_rss_mb": round(peak), "orin_nano_budget_mb": budget,
            "fits": peak <= budget}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lm", type=Path, required=True, help="LM bundle (SmolLM2 export)")
    ap.add_argument("--lm-extra", type=Path, nargs="*", default=[],
                    help="further LM bundles for section C (e.g. the fp32 export)")
    ap.add_argument("--asr", type=Path, help="Whisper tiny.en bundle (exported if not given)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgestream-bench-responder"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sections", nargs="+", default=["A", "B", "C", "D"])
    args = ap.parse_args()
    from edgestream.runtime import load
    from edgestream.runtime.responder import load_lm

    asr_dir = args.asr or args.work / "whisper-tiny.en"
    if not (asr_dir / "manifest.json").is_file():
        from edgestream.export.build import ExportOptions, export_bundle

        export_bundle(ExportOptions("builtin:whisper-tiny.en", asr_dir, force=True))
    asr = load(asr_dir, provider="cpu")
    lm = load_lm(args.lm, provider="cpu")
    precision = lm.manifest.graphs[0].precision
    print(f"# machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; LM {args.lm} "
          f"({precision}); ASR {asr_dir}; runs {args.runs}", flush=True)
    report: dict = {}
    if "D" in args.sections:  # first: resident memory before the other sections load more
        report["D_memory"] = section_d(asr, lm)
        print(json.dumps({"D_memory": report["D_memory"]}), flush=True)
    if "A" in args.sections:
        report["A_endpoint_to_first_token"] = section_a(asr, lm, args.runs)
        print(json.dumps({"A": report["A_endpoint_to_first_token"]}), flush=True)
    if "B" in args.sections:
        lm1 = load_lm(args.lm, provider="cpu", threads=1)
        report["B_recognizer"] = section_b(asr, lm1, args.runs)
        print(json.dumps({"B": report["B_recognizer"]}), flush=True)
    if "C" in args.sections:
        lms = {precision: lm}
        for extra in args.lm_extra:
            e = load_lm(extra, provider="cpu")
            lms[e.manifest.graphs[0].precision] = e
        report["C_decode_tokens_per_s"] = section_c(lms, args.runs, args.work)
        print(json.dumps({"C": report["C_decode_tokens_per_s"]}), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
