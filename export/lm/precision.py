"""The accuracy gate that picks an LM bundle's precision: weight-only int4 or int8 (MatMulNBits,
block 32 for int4, 64 for int8, symmetric) against the fp32 graph, on a fixed prompt set.

Token agreement: the fp32 graph's greedy continuation of every prompt, teacher-forced through the
candidate, and every next-token position of a fixed passage; the share of positions where the
candidate's choice is fp32's (about 400 positions for SmolLM2: with the three parity prompts
alone, 96 positions, one near-tie flip more or less moved int8 across the limit). Perplexity: of
the passage, candidate against fp32. The smallest candidate within both limits is shipped.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgestream.export.errors import ExportError
from edgestream.export.lm.chat import render_conversation
from edgestream.export.lm.parity import NEW_TOKENS, PASSAGE, PROMPTS, SYSTEM

# the parity prompts and more, so that a few hundred positions decide
GATE_PROMPTS = PROMPTS + ("Why is the sky blue?", "Give me three tips for sleeping better.",
                          "Write a haiku about the sea.", "What does a kiosk do?",
                          "Explain what a microphone does in one sentence.")
from edgestream.export.lm.graphs import LM_EXTERNAL
from edgestream.export.onnx_export import external_files, file_hashes, graph_bytes, save_model
from edgestream.export.quantize import fold_weight_transposes
from edgestream.runtime.manifest import MANIFEST_NAME
from edgestream.runtime.responder.engine import LMEngine
from edgestream.runtime.responder.lm import LanguageModel, load_lm

log = logging.getLogger(__name__)

MIN_AGREEMENT = 0.90  # share of greedy positions where the candidate picks fp32's token
MAX_PPL_RATIO = 1.10  # candidate perplexity / fp32 perplexity on the passage
# weights per scale. int8 at 64: SmolLM2-135M one-thread decode 51.6 against 49.2 tokens per
# CPU second at 32 (onnxruntime-genai's own builder at 64 and 32 moved alike: 51.9, 48.9), 3 %
# smaller, agreement 0.921 against 0.918; 128 pads K=576 to 640 and is larger. int4 stays at 32
# (already the coarse one).
BLOCK = {"int4": 32, "int8": 64}
BITS = {"int4": 4, "int8": 8}


def quantize_weights(path: Path, bits: int, block: int) -> None:
    """Weight-only quantization of every MatMul with a constant weight, in place. The tied
    output projection reads the embedding through a Transpose, which is folded first so the
    largest matmul is quantized too."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = onnx.load(str(path))
    fold_weight_transposes(model)
    # accuracy_level 4: int8 activations inside MatMulNBits, the fast CPU kernels; the gate
    # below measures what that costs
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True,
                             accuracy_level=4)
    q.process()
    save_model(q.model.model, path, LM_EXTERNAL)


def _sequences(lm: LanguageModel) -> list[list[int]]:
    """The fixed prompts followed by the fp32 graph's own greedy continuation."""
    out = []
    for prompt in GATE_PROMPTS:
        ids = lm.encode(render_conversation(lm.spec.chat, SYSTEM, [], prompt))
        engine = LMEngine(lm)
        out.append((ids, engine.greedy(engine.feed(ids), NEW_TOKENS)))
    return out


def _passage_logits(lm: LanguageModel, passage: list[int]) -> np.ndarray:
    return LMEngine(lm).feed(passage, all_logits=True)[:-1].astype(np.float64)


def measure(lm: LanguageModel, sequences: list, passage: list[int],
            reference: np.ndarray | None = None) -> dict:
    """Agreement with fp32's choices (`reference`: fp32's argmax at each passage position;
    None when `lm` is fp32 itself) and perplexity of the passage."""
    agree = total = 0
    for ids, cont in sequences:
        if not cont:
            continue
        logits = LMEngine(lm).feed(ids + cont, all_logits=True)[len(ids) - 1: -1]
        agree += int((logits.argmax(-1) == np.array(cont)).sum())
        total += len(cont)
    logits = _passage_logits(lm, passage)
    choices = logits.argmax(-1)
    agree += int((choices == (choices if reference is None else reference)).sum())
    total += len(choices)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(passage) - 1), passage[1:]].mean()
    return {"agreement": agree / max(total, 1), "positions": total, "ppl": math.exp(float(nll))}


def _copy_graph(src: Path, dst: Path) -> None:
    """Copy lm.onnx and its external data from folder `src` to folder `dst`."""
    for name in ("lm.onnx", *external_files(src / "lm.onnx")):
        shutil.copy(src / name, dst / name)


def _candidate(folder: Path, data: dict, precision: str, where: Path) -> dict:
    shutil.copy(folder / "tokenizer.json", where / "tokenizer.json")
    _copy_graph(folder, where)
    quantize_weights(where / "lm.onnx", BITS[precision], BLOCK[precision])
    out = json.loads(json.dumps(data))
    hashes = file_hashes(where / "lm.onnx")
    for g in out["graphs"]:
        g.pop("external_data", None)
        g.update(hashes, precision=precision)
    (where / MANIFEST_NAME).write_text(json.dumps(out, indent=2) + "\n")
    return out


def choose_precision(parts: Any, folder: Path, data: dict, opts: Any) -> dict:
    """Quantize, measure, and ship the smallest precision that passes (or the one asked for,
    if it passes). Writes the gate's report into `data["accuracy"]`."""
    from edgestream.export.lm.recipe import LMExportOptions, PRECISIONS

    wanted = (opts.lm or LMExportOptions()).precision
    if wanted not in PRECISIONS:
        raise ExportError(f"--lm-precision {wanted!r}: use one of {', '.join(PRECISIONS)}")
    if wanted == "fp32":
        data["accuracy"] = {"chosen": "fp32", "gate": "not run (fp32 asked for)"}
        return data
    fp32 = load_lm(folder, provider="cpu")
    sequences = _sequences(fp32)
    passage = fp32.encode(PASSAGE)
    reference = _passage_logits(fp32, passage).argmax(-1)
    report: dict = {"fp32": measure(fp32, sequences, passage), "min_agreement": MIN_AGREEMENT,
                    "max_ppl_ratio": MAX_PPL_RATIO, "block_size": BLOCK,
                    "fp32_bytes": graph_bytes(folder / "lm.onnx")}
    chosen, chosen_data = "fp32", data
    for precision in (["int4", "int8"] if wanted == "auto" else [wanted]):
        with tempfile.TemporaryDirectory(prefix=f".{precision}-", dir=folder.parent) as tmp:
            cand = _candidate(folder, data, precision, Path(tmp))
            m = measure(load_lm(tmp, provider="cpu"), sequences, passage, reference)
            m["ppl_ratio"] = m["ppl"] / report["fp32"]["ppl"]
            m["bytes"] = graph_bytes(Path(tmp) / "lm.onnx")
            m["passed"] = m["agreement"] >= MIN_AGREEMENT and m["ppl_ratio"] <= MAX_PPL_RATIO
            report[precision] = m
            if m["passed"]:
                _copy_graph(Path(tmp), folder)
                chosen, chosen_data = precision, cand
                break
    if wanted != "auto" and chosen != wanted:
        raise ExportError(f"--lm-precision {wanted}: token agreement {report[wanted]['agreement']:.3f}"
                          f" (needs {MIN_AGREEMENT}) / perplexity ratio "
                          f"{report[wanted]['ppl_ratio']:.3f} (at most {MAX_PPL_RATIO}); "
                          "export with --lm-precision auto or fp32")
    report["chosen"] = chosen
    chosen_data = dict(chosen_data)
    chosen_data["parity"] = data.get("parity", {})
    chosen_data["accuracy"] = report
    log.info("LM precision: %s (%s)", chosen, report)
    return chosen_data
