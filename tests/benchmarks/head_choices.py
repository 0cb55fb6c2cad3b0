"""Greedy choices from the decoder's head, before and after (issue 8), side by side in one run:
per-window `transcribe` time and the bytes each decoder run copies to the host, on Whisper.

Rows (execution host and bound, CPU provider, 1 thread; medians over `--runs`):
  before: logits   a bundle exported without the timestamp head (as before this change), read
                   the way the runtime did then: block passes and timestamped steps copy their
                   logits ([K or 1, 51864] float32) to the host and choose there
  after: head      the current bundle and runtime: every greedy step and block row returns only
                   its id and log-probability; the no-speech probe copies one row of logits per
                   window, and the loop guard's forced closes read the logits of that step
Transcripts must be identical (printed). Timing runs are not instrumented; one extra pass per row
counts decoder runs and the bytes `StepOutputs.host`/`host_row` return.

    .venv/bin/python tests/benchmarks/head_choices.py --export --before B --after A  # once
    flock /tmp/edgestream-bench.lock nice -n 0 .venv/bin/python \\
        tests/benchmarks/head_choices.py --before B --after A [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

SPEECH = Path(__file__).resolve().parents[1] / "data" / "speech"
CLIPS = ("beckett", "arctic_a0007", "arctic_a0009", "two_cities")


def export_pair(before: Path, after: Path, quantize: str, eval_windows: int = 300) -> None:
    """builtin:whisper-tiny.en twice: with the timestamp head (after) and without (before);
    a folder that already holds a bundle is kept."""
    from edgestream.export.build import ExportOptions, export_bundle

    if not (after / "manifest.json").is_file():
        export_bundle(ExportOptions("builtin:whisper-tiny.en", after, quantize=quantize,
                                    force=True, eval_windows=eval_windows))
    if not (before / "manifest.json").is_file():
        export_before(before, quantize, eval_windows)


def export_before(out: Path, quantize: str, eval_windows: int = 300) -> None:
    """builtin:whisper-tiny.en with the decoder graph as exported before the timestamp head."""
    from edgestream.export.build import ExportOptions, export_bundle
    from edgestream.export.whisper import graphs, recipe

    class NoTimestampHead(graphs.WhisperDecoderStep):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "no_timestamps": -1})

    saved = recipe.WhisperDecoderStep
    recipe.WhisperDecoderStep = NoTimestampHead  # type: ignore[misc]
    try:
        export_bundle(ExportOptions("builtin:whisper-tiny.en", out, quantize=quantize,
                                    force=True, eval_windows=eval_windows))
    finally:
        recipe.WhisperDecoderStep = saved  # type: ignore[misc]


def _engine(bundle: Path, execution: str, head_blocks: bool) -> Any:
    from edgestream.runtime import decode
    from edgestream.runtime.bundle import Bundle
    from edgestream.runtime.families.whisper import engine as whisper
    from edgestream.runtime.session import SessionConfig

    eng = whisper.WhisperEngine(Bundle.open(bundle, SessionConfig("cpu", 1, execution=execution)))
    if not head_blocks:  # the runtime before: block passes read through their logits
        def logits_blocks(*args: Any, block_head: Any = None, **kwargs: Any) -> Any:
            return decode.greedy_decode(*args, **kwargs)
        eng.decode = _with(whisper, "greedy_decode", logits_blocks, eng.decode)
    return eng


def _with(module: Any, name: str, value: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` run with `module.name` replaced by `value`."""
    def run(*args: Any, **kwargs: Any) -> Any:
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            return fn(*args, **kwargs)
        finally:
            setattr(module, name, saved)
    return run


def _transcribe(eng: Any, clips: list[np.ndarray]) -> tuple[list[str], int]:
    from edgestream.runtime.families.whisper.transcribe import WindowDecode, transcribe_audio

    texts, windows = [], 0
    for audio in clips:
        record: list[WindowDecode] = []
        texts.append(transcribe_audio(eng, audio, record=record).text)
        windows += len(record)
    return texts, windows


def _count(eng: Any, clips: list[np.ndarray]) -> dict[str, float]:
    """One instrumented pass: decoder runs by size, bytes copied to the host by output name."""
    from edgestream.runtime.device_state import StepOutputs

    runs = {"step": 0, "block": 0}
    fetched: dict[str, int] = {}
    host, host_row, run = StepOutputs.host, StepOutputs.host_row, eng.states.run

    def counted_host(self: StepOutputs, name: str) -> np.ndarray:
        out = host(self, name)
        fetched[name] = fetched.get(name, 0) + out.nbytes
        return out

    def counted_row(self: StepOutputs, name: str, row: int) -> np.ndarray:
        out = host_row(self, name, row)
        fetched[name] = fetched.get(name, 0) + out.nbytes
        return out

    def counted_run(graph: str, inputs: dict, *args: Any, **kwargs: Any) -> Any:
        if graph == eng.block_graph and "tokens" in inputs:
            runs["step" if inputs["tokens"].shape[1] == 1 else "block"] += 1
        return run(graph, inputs, *args, **kwargs)

    StepOutputs.host, StepOutputs.host_row = counted_host, counted_row  # type: ignore[method-assign]
    eng.states.run = counted_run
    try:
        _, windows = _transcribe(eng, clips)
    finally:
        StepOutputs.host, StepOutputs.host_row = host, host_row  # type: ignore[method-assign]
        eng.states.run = run
    decoder = {k: v for k, v in fetched.items() if k in ("logits", "choice", "choice_logprob")}
    total_runs = runs["step"] + runs["block"]
    return {"windows": windows, "steps": runs["step"], "blocks": runs["block"],
            "bytes_per_run": sum(decoder.values()) / max(total_runs, 1),
            "logit_bytes_per_run": decoder.get("logits", 0) / max(total_runs, 1),
            "bytes_per_window": sum(decoder.values()) / max(windows, 1)}


def main(argv: list[str] | None = None) -> int:
    from edgestream.runtime.audio.wav import read_wav, to_mono

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, required=True)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--export", action="store_true", help="export both bundles first")
    p.add_argument("--quantize", default="int8")
    p.add_argument("--eval-windows", type=int, default=300, help="accuracy-gate windows (export)")
    args = p.parse_args(argv)
    if args.export:
        export_pair(args.before, args.after, args.quantize, args.eval_windows)
        return 0
    clips = [to_mono(read_wav(SPEECH / f"{c}.wav").samples) for c in CLIPS]
    rows = {f"{label}, {ex}": _engine(bundle, ex, heads)
            for label, bundle, heads in (("before: logits", args.before, False),
                                         ("after: head", args.after, True))
            for ex in ("host", "bound")}
    texts = {name: _transcribe(eng, clips)[0] for name, eng in rows.items()}  # warm-up
    per_window: dict[str, list[float]] = {name: [] for name in rows}
    names = list(rows)
    for r in range(args.runs):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order
            start = time.perf_counter()
            _, windows = _transcribe(rows[name], clips)
            per_window[name].append((time.perf_counter() - start) * 1e3 / windows)
    counts = {name: _count(eng, clips) for name, eng in rows.items()}
    base = statistics.median(per_window["before: logits, bound"])
    print(f"Whisper transcribe, {len(clips)} clips, 1 thread, median of {args.runs} runs; "
          f"load average {os.getloadavg()[0]:.2f} at the end")
    print(f"{'row':<24}{'ms/window':>10}{'ratio':>7}{'windows':>8}{'steps':>7}{'blocks':>7}"
          f"{'B/run':>9}{'logit B/run':>12}{'B/window':>10}")
    for name in names:
        c, ms = counts[name], statistics.median(per_window[name])
        print(f"{name:<24}{ms:>10.1f}{ms / base:>7.2f}{c['windows']:>8}{c['steps']:>7}"
              f"{c['blocks']:>7}{c['bytes_per_run']:>9.0f}{c['logit_bytes_per_run']:>12.0f}"
              f"{c['bytes_per_window']:>10.0f}")
    same = all(t == texts[names[0]] for t in texts.values())
    print(f"transcripts identical across rows: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
