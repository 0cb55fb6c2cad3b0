"""`edgestream export`: SOURCE -> bundle folder, written only when parity and the gate pass.

A recipe per model family knows how to load the source, export its step graphs and check parity;
this module resolves the source, runs the recipe in a temporary folder next to the output, adds the
VAD, lets the accuracy gate (`gate`) pick the quantized variant, and moves the folder into place
only when everything passed. Any failure or interruption leaves the old bundle as it was.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgestream.export.errors import ExportError, ParityError
from edgestream.export.sources import ResolvedSource, resolve
from edgestream.runtime.bundle import sha256_file
from edgestream.runtime.manifest import MANIFEST_NAME, parse_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    """What the user asked for. `parity_audio`: clips for the parity check (default: the demo
    clip shipped with the runtime). `chunk_ms`, `window_semantics`, `max_memory_frames` apply to
    streaming encoders (moonshine_streaming). `quantize`: see `gate.precision_plan`;
    `eval_audio`, `wer_budget`, `min_agreement`, `eval_windows`, `eval_wer_copies` drive the
    accuracy gate every quantized variant must pass (`evaluation`)."""

    source: str
    out: Path
    revision: str | None = None
    language: str = "en"
    vad: str = "silero"
    parity_audio: tuple[Path, ...] = field(default_factory=tuple)
    force: bool = False
    chunk_ms: int = 80
    window_semantics: str = "transformers"
    max_memory_frames: int = 0  # 0: 30 s (1500 rows) or the model's limit if smaller
    max_tokens: int = 256
    quantize: str = "none"
    block_size: int = 32  # MatMulNBits weights per scale (int4, int8-nbits)
    target: str = "cpu"  # the device class the precisions must run on
    eval_audio: Path | None = None  # default: the project's real clips
    wer_budget: float = 1.0  # WER points over fp32 a variant may lose
    # greedy-token agreement with fp32 a variant must keep; real tiny.en int8 keeps 0.93 over
    # clean and noisy windows (noise makes the fp32 path itself uncertain) at a better WER
    min_agreement: float = 0.90
    eval_windows: int = 300
    # noisy copies of every referenced clip transcribed for WER (evaluation.WER_NOISE_COPIES);
    # 0: the clean clips only (random test models, whose WER means nothing, save the time)
    eval_wer_copies: int = 3
    lm: Any = None  # decoder LMs: export.lm.recipe.LMExportOptions (None: its defaults)

    def __post_init__(self) -> None:
        # the gate's numbers: a wrong one would make it pass or refuse every variant
        bad = []
        if not (isinstance(self.eval_windows, int) and self.eval_windows >= 1):
            bad.append(f"--eval-windows {self.eval_windows}: give a whole number of at least 1")
        if not (isinstance(self.eval_wer_copies, int) and self.eval_wer_copies >= 0):
            bad.append(f"--eval-wer-copies {self.eval_wer_copies}: give a whole number >= 0")
        if not self.wer_budget >= 0:
            bad.append(f"--wer-budget {self.wer_budget}: give WER points >= 0")
        if not 0.0 <= self.min_agreement <= 1.0:
            bad.append(f"--min-agreement {self.min_agreement}: give a share from 0 to 1")
        if bad:
            raise ExportError("accuracy gate options are not valid: " + "; ".join(bad))


def default_parity_audio() -> tuple[Path, ...]:
    from importlib.resources import files

    return (Path(str(files("edgestream.runtime") / "assets" / "beckett.wav")),)


@dataclass(frozen=True)
class Recipe:
    """How one model family is exported: load -> (model, parts), graphs -> manifest dict,
    parity -> report."""

    load: Callable[[ResolvedSource, ExportOptions], Any]
    graphs: Callable[[Any, Path, ExportOptions], dict]
    parity: Callable[[Any, Path, list[Path]], dict]
    audio: bool = True  # a speech model (gets the VAD); False for decoder LMs
    # after a passed parity check: (parts, folder, manifest dict, options) -> manifest dict
    # (decoder LMs pick their precision here)
    finish: Callable[[Any, Path, dict, ExportOptions], dict] | None = None


def _whisper() -> Recipe:
    from edgestream.export.whisper.parity import check_whisper_parity
    from edgestream.export.whisper.recipe import export_whisper_graphs, load_whisper

    return Recipe(lambda src, o: load_whisper(src, o.revision, o.language),
                  lambda parts, out, o: export_whisper_graphs(parts, out,
                                                              fuse=o.target == "cpu"),
                  lambda parts, out, clips: check_whisper_parity(parts.model, out, clips))


def _moonshine() -> Recipe:
    from edgestream.export.moonshine.parity import check_moonshine_parity
    from edgestream.export.moonshine.recipe import export_moonshine_graphs, load_moonshine

    def graphs(parts: Any, out: Path, o: ExportOptions) -> dict:
        if o.chunk_ms % 20 or not 20 <= o.chunk_ms <= 320:
            raise ExportError(f"--chunk-ms {o.chunk_ms}: must be a multiple of 20 ms between 20 "
                              "and 320 (encoder frames are 20 ms)")
        rows = o.max_memory_frames or min(1500, parts.model.config.max_position_embeddings)
        return export_moonshine_graphs(parts, out, o.chunk_ms // 20, o.window_semantics, rows,
                                       o.max_tokens)

    return Recipe(lambda src, o: load_moonshine(src, o.revision), graphs,
                  lambda parts, out, clips: check_moonshine_parity(parts.model, out, clips))


def _lm() -> Recipe:
    from edgestream.export.lm.recipe import lm_recipe

    return lm_recipe(Recipe)


RECIPES: dict[str, Callable[[], Recipe]] = {"whisper": _whisper, "moonshine_streaming": _moonshine}
# decoder-only LMs for the responder (export/lm)
RECIPES.update({family: _lm for family in ("llama", "qwen3", "lfm2")})
# hybrids: Gated DeltaNet + gated attention (+ MoE); a qwen3_5* checkpoint exports its text backbone
RECIPES.update({family: _lm for family in ("qwen3_next", "qwen3_5", "qwen3_5_text",
                                           "qwen3_5_moe", "qwen3_5_moe_text")})


def graphs_to_quantize(data: dict, mode: str) -> tuple[str, ...]:
    """Model graphs (never the VAD) that `mode` quantizes. int8-encoder keeps the decoder fp32:
    dynamic int8 quantizes a block's activations jointly, so block and step logits would drift
    apart (0.03 measured) and re-scoring would stop being exact."""
    return tuple(g["name"] for g in data["graphs"] if g["name"] != data.get("vad")
                 and (mode != "int8-encoder" or not g["name"].startswith("decoder")))


def _finish(tmp: Path, out: Path) -> None:
    """Move the finished bundle into place. The old bundle is renamed aside first and deleted
    only after the new one is in place; if that fails it is put back."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        old.rmdir()
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_bundle(opts: ExportOptions) -> dict:
    """Export, check parity, and move the bundle into place; returns the parity report."""
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "torch._dynamo", "torch.export",
                  "torch.onnx._internal.exporter._registration"):
        logging.getLogger(noisy).setLevel(logging.ERROR)  # exporter chatter is not for users
    if opts.out.exists() and any(opts.out.iterdir()) and not opts.force:
        raise ExportError(f"{opts.out}: output folder exists and is not empty; pass --force "
                          "to replace it")
    if opts.quantize not in ("none", "fp32"):
        from edgestream.export.gate import check_quantize_option

        check_quantize_option(opts)  # a bad --quantize fails before minutes of export
    src = resolve(opts.source, opts.revision)
    if src.model_type not in RECIPES:
        raise ExportError(f"{opts.source}: model type {src.model_type!r} has no export recipe "
                          f"yet (supported: {', '.join(RECIPES)})")
    recipe = RECIPES[src.model_type]()
    parts = recipe.load(src, opts)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    # everything is built beside the target (same file system: the final move is a rename) and
    # removed on any failure or interruption, so the old bundle stays as it was
    scratch = Path(tempfile.mkdtemp(prefix=f".{opts.out.name}.", dir=opts.out.parent))
    tmp = scratch / "fp32"
    tmp.mkdir()
    try:
        data = recipe.graphs(parts, tmp, opts)
        if recipe.audio:  # long attentions a slice of query rows at a time: exact, less memory
            from edgestream.export.attention_rows import slice_bundle_attention

            slice_bundle_attention(tmp, data)
        data["tokenizer"]["sha256"] = sha256_file(tmp / data["tokenizer"]["file"])
        if opts.vad == "silero" and recipe.audio:
            from edgestream.export.vad import add_silero_vad

            graph, state = add_silero_vad(tmp)
            data["graphs"].append(graph)
            data["states"].append(state)
            data["vad"] = "vad"
        parse_manifest(data)  # the same checks the device will run
        (tmp / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")
        report = recipe.parity(parts, tmp, list(opts.parity_audio or default_parity_audio()))
        data["parity"] = report
        (tmp / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")
        if not report["passed"]:
            raise ParityError(f"{opts.source}: parity check failed, bundle not written:\n"
                              + json.dumps(report, indent=2), report)
        if recipe.finish is not None:  # decoder LMs: their own precision gate
            data = recipe.finish(parts, tmp, data, opts)
            (tmp / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")
        final = tmp
        if opts.quantize not in ("none", "fp32"):
            from edgestream.export.gate import choose_variant

            final = choose_variant(recipe, parts, tmp, data, opts, scratch)
        _finish(final, opts.out)
        return report
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
