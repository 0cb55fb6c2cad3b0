"""Precision per graph and the accuracy gate that decides which quantized variant ships.

`--quantize` takes one precision for every model graph (`int8`), one per graph
(`encoder=int8,decoder=int4`), `int8-encoder` (the audio side only), or `auto`: every candidate the
target device runs is exported and measured, and the fastest within the WER budget ships. Each
variant is built in its own folder from the fp32 export and measured against it
(`evaluation.WhisperEvaluator`, `evaluation.MoonshineEvaluator`: WER, greedy-token agreement
over a few hundred windows, max logit difference, size, latency; for moonshine_streaming also the
block-vs-step logit difference that exact re-scoring needs). A variant passes when it loses at most `wer_budget` WER points and
keeps at least `min_agreement` of fp32's greedy tokens. The whole table goes into the manifest
(`accuracy`) and is printed; if nothing passes, the export fails with the table and writes nothing.

Families without an evaluator are held to the parity clips instead: identical greedy tokens on
every clip.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from edgestream.export.errors import ExportError, ParityError
from edgestream.export.quantize import BLOCK_SIZES, NBITS, PRECISIONS, quantize_graphs
from edgestream.runtime.manifest import MANIFEST_NAME

log = logging.getLogger(__name__)

# what each device class runs well: dynamic int8 (MatMulInteger) is a CPU kernel and slow on
# CUDA; the CPU provider computes fp16 graphs in fp32, so fp16 is for GPUs only; int8-qdq is
# TensorRT's int8; the CPU provider runs it correctly but slowly (tiny random Whisper, loaded
# machine: decoder step 47 ms vs 6 ms fp32), so it is no CPU `auto` candidate
TARGETS = {"cpu": ("fp32", "int8", "int4", "int8-nbits", "int8-qdq"),
           "gpu": ("fp32", "fp16", "int4", "int8-nbits", "int8-qdq")}
AUTO = {"cpu": ("int8", "encoder=int8,decoder=int4", "int4"),
        "gpu": ("fp16", "encoder=fp16,decoder=int4", "int8-qdq")}
# moonshine_streaming re-scores its hypothesis in K-token passes: its CPU candidates add 8-bit
# decoders with exact re-scoring (fp32 activations), and its memory graph is quantized too
AUTO_BY_FAMILY = {"moonshine_streaming": {
    "cpu": ("int8", "encoder=int8,memory=int8,decoder=int8-nbits",
            "encoder=int8,memory=int8,decoder=int4", "int4"),
    "gpu": ("fp16", "encoder=fp16,memory=fp16,decoder=int4", "int8-qdq")}}
TYPICAL_STEPS = 32  # decoder steps per window, to rank variants by speed


def precision_plan(spec: str, graphs: list[str], target: str = "cpu") -> dict[str, str]:
    """{graph: precision} for a --quantize value; every error names the option and the choices."""
    if target not in TARGETS:
        raise ExportError(f"--target {target!r}: use one of {', '.join(TARGETS)}")
    spec = spec.strip()
    if spec in ("none", "fp32"):
        return {}
    if spec == "int8-encoder":
        return {g: "int8" for g in graphs if not g.startswith("decoder")}
    if "=" not in spec:
        plan = {g: spec for g in graphs}
    else:
        plan = {}
        for part in spec.split(","):
            graph, _, precision = part.partition("=")
            graph, precision = graph.strip(), precision.strip()
            if graph not in graphs:
                raise ExportError(f"--quantize {spec!r}: this model has no graph {graph!r} "
                                  f"(graphs: {', '.join(graphs)})")
            plan[graph] = precision
    for graph, precision in plan.items():
        if precision not in PRECISIONS:
            raise ExportError(f"--quantize {spec!r}: unknown precision {precision!r}; use one "
                              f"of {', '.join(PRECISIONS)}, int8-encoder, auto, or "
                              "GRAPH=PRECISION,... per graph")
        if precision not in TARGETS[target]:
            other = [t for t, ok in TARGETS.items() if precision in ok]
            hint = f"; pass --target {other[0]} or choose another" if other else ""
            raise ExportError(f"--quantize {spec!r}: {precision} is not a precision the {target} "
                              f"target runs well (it runs {', '.join(TARGETS[target])}){hint}")
    return {g: p for g, p in plan.items() if p != "fp32"}


def check_quantize_option(opts: Any) -> None:
    """Refuse a bad --quantize / --target / --block-size before anything is exported."""
    if opts.quantize != "auto":
        # graph names are not known yet: check the precisions against a generic graph list
        names = [p.partition("=")[0].strip() for p in opts.quantize.split(",")] \
            if "=" in opts.quantize else ["encoder", "decoder"]
        precision_plan(opts.quantize, names, opts.target)
    elif opts.target not in TARGETS:
        raise ExportError(f"--target {opts.target!r}: use one of {', '.join(TARGETS)}")
    if opts.block_size not in BLOCK_SIZES:
        raise ExportError(f"--block-size {opts.block_size}: MatMulNBits takes one of "
                          f"{', '.join(map(str, BLOCK_SIZES))} weights per scale")
    if opts.eval_audio is not None and not (Path(opts.eval_audio) / "refs.tsv").is_file():
        raise ExportError(f"{Path(opts.eval_audio) / 'refs.tsv'}: --eval-audio needs a folder "
                          "with refs.tsv (file, tab, reference text per line)")
    if opts.eval_audio is not None:  # a missing or unreadable clip fails now, not after export
        from edgestream.export.evaluation import load_eval_set

        load_eval_set(Path(opts.eval_audio), max_windows=1)


def format_table(rows: list[dict]) -> str:
    """The accuracy table as aligned text."""
    head = ("variant", "WER %", "dWER", "agree", "same win", "max dlogit", "block-step", "MB",
            "step ms", "enc ms", "ok")
    lines = [head]
    for r in rows:
        rescoring = r.get("block_step_diff")
        lines.append((r["variant"], f"{r['wer']:.2f}", f"{r['wer_delta']:+.2f}",
                      f"{r['agreement']:.4f}", f"{r['identical_windows']}/{r['windows']}",
                      f"{r['max_logit_diff']:.3g}",
                      "-" if rescoring is None else f"{rescoring:.2g}", f"{r['size_mb']:.1f}",
                      f"{r['step_ms']:.2f}", f"{r['encode_ms']:.0f}",
                      "yes" if r["passed"] else f"no: {r['reason']}"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines)


def _build(fp32: Path, data: dict, plan: dict[str, str], folder: Path, block: int,
           calibration_audio: Path | None = None) -> dict:
    shutil.copytree(fp32, folder)
    out = quantize_graphs(folder, data, plan, block_size=block,
                          calibration_audio=calibration_audio)
    (folder / MANIFEST_NAME).write_text(json.dumps(out, indent=2) + "\n")
    return out


def _parity_gate(recipe: Any, parts: Any, folder: Path, name: str, opts: Any) -> dict:
    from edgestream.export.build import default_parity_audio

    report = recipe.parity(parts, folder, list(opts.parity_audio or default_parity_audio()))
    ok = report["identical_clips"] == len(report["clips"])
    return {"variant": name, "identical_clips": report["identical_clips"],
            "clips": len(report["clips"]), "max_logit_diff": report["max_logit_diff"],
            "max_block_logit_diff": report.get("max_block_logit_diff"), "passed": ok,
            "reason": "" if ok else "greedy tokens changed on a parity clip"}


def choose_variant(recipe: Any, parts: Any, fp32: Path, data: dict, opts: Any,
                   scratch: Path) -> Path:
    """Build and measure the requested variant(s) beside `fp32`; return the folder that ships
    (its manifest carries the table) or raise ParityError with the table."""
    graphs = [g["name"] for g in data["graphs"] if g["name"] != data.get("vad")]
    auto = AUTO_BY_FAMILY.get(data["family"], AUTO)
    specs = auto[opts.target] if opts.quantize == "auto" else (opts.quantize,)
    plans = [(spec, precision_plan(spec, graphs, opts.target)) for spec in specs]
    evaluator = None
    from edgestream.export.evaluation import EVALUATORS, default_eval_dir, load_eval_set

    if data["family"] in EVALUATORS:
        folder = Path(opts.eval_audio) if opts.eval_audio else default_eval_dir()
        evaluator = EVALUATORS[data["family"]](
            fp32, load_eval_set(folder, max_windows=opts.eval_windows,
                                wer_noise_copies=opts.eval_wer_copies))
    rows, folders, manifests = [], {}, {}
    if evaluator is not None:
        rows.append(evaluator.reference.row())
    for i, (spec, plan) in enumerate(plans):
        folder = scratch / f"variant{i}"
        manifests[spec] = _build(fp32, data, plan, folder, opts.block_size, opts.eval_audio)
        folders[spec] = folder
        if evaluator is None:
            rows.append(_parity_gate(recipe, parts, folder, spec, opts))
            continue
        row = evaluator.measure(folder, spec, plan).row()
        reasons = []
        if row["wer_delta"] > opts.wer_budget:
            reasons.append(f"WER +{row['wer_delta']:.2f} > budget {opts.wer_budget}")
        if row["agreement"] < opts.min_agreement:
            reasons.append(f"agreement {row['agreement']:.4f} < {opts.min_agreement}")
        row.update(passed=not reasons, reason="; ".join(reasons))
        rows.append(row)
        log.info("gate %s: %s", spec, row)
    candidates = [r for r in rows if r["variant"] in folders and r["passed"]]
    table = {"target": opts.target, "wer_budget": opts.wer_budget,
             "min_agreement": opts.min_agreement, "block_size": opts.block_size,
             "eval_audio": evaluator.data.folder if evaluator else None,
             "windows": len(evaluator.data.windows) if evaluator else 0, "rows": rows}
    if not candidates:
        text = format_table(rows) if evaluator else json.dumps(rows, indent=2)
        raise ParityError(f"{opts.source}: no quantized variant passed the accuracy gate "
                          f"(--quantize {opts.quantize}); nothing was written. Raise "
                          f"--wer-budget, choose another precision or a smaller --block-size, "
                          f"or export with --quantize none:\n{text}", table)
    if evaluator is not None:
        best = min(candidates, key=lambda r: r["encode_ms"] + TYPICAL_STEPS * r["step_ms"])
    else:
        best = candidates[0]
    table["chosen"] = best["variant"]
    out = manifests[best["variant"]]
    out["accuracy"] = table
    (folders[best["variant"]] / MANIFEST_NAME).write_text(json.dumps(out, indent=2) + "\n")
    return folders[best["variant"]]


__all__ = ["NBITS", "TARGETS", "AUTO", "AUTO_BY_FAMILY", "precision_plan", "choose_variant", "format_table"]
