"""Precisions of a bundle's graphs, applied in place, one graph at a time (see PRECISIONS).

MatMul/Gemm weights only: convolution front ends stay fp32 (dynamic int8 of the conv front end is
slower, DESIGN.md 8), as do attention matmuls between two activations. In int8, the weights of
BLOCKWISE_INT8 (Whisper) are 8-bit MatMulNBits with blockwise int8 activations, the rest dynamic
int8. Whisper's
tied output projection is exported as ``MatMul(x, Transpose(embedding))``; the quantizers only
quantize a weight that is an initializer, so they would silently leave the largest decoder matmul
in fp32.
The transpose is folded into a new initializer first, and after quantization the embedding
``Gather`` is rewritten to read the projection's quantized bytes (`qgather`), so the vocabulary
matrix is stored once and never as an fp32 table.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgestream.export.errors import ExportError
from edgestream.export.onnx_export import (EXTERNAL_THRESHOLD, file_hashes,
                                           graph_bytes, save_model, weight_bytes)
from edgestream.export.nbits_split import split_8bit
from edgestream.export.qgather import rewrite_tied_gathers
from edgestream.runtime.bundle import sha256_file

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("MatMul", "Gemm")
# What each precision is (the manifest's `precision` of a graph):
PRECISIONS = {
    "fp32": "as exported",
    "fp16": "fp16 weights and compute for GPUs; normalisation, softmax and graph inputs/outputs "
            "(the state) stay fp32",
    "int8": "dynamic int8 per-channel weights (MatMulInteger) for CPUs; the tied embedding is "
            "a quantized gather; Whisper's decoder weights and encoder attention outputs are "
            "8-bit MatMulNBits with int8 activations per block of a row",
    "int4": "4-bit weights in blocks (MatMulNBits); graphs run at several token counts (the "
            "decoder's step and block) keep fp32 activations, so a K-token block and one-token "
            "steps agree (exact re-scoring); others quantize activations to int8 per row",
    "int8-nbits": "8-bit weights in blocks (MatMulNBits); graphs run at several token counts "
                  "keep fp32 activations (each 8-bit weight as two exact 4-bit halves, the fast "
                  "fp32-activation kernel), so block and step agree; others quantize "
                  "activations to int8 per row",
    "int8-qdq": "static int8 in QDQ form for TensorRT: per-channel symmetric weights, symmetric "
                "activation scales calibrated on speech (the fp32 bundle's own inputs while it "
                "transcribes the calibration clips); fixed scales, so block and step agree on "
                "small models (not bitwise: moonshine_streaming tiny at published width 1.2e-2)",
}
NBITS = {"int4": 4, "int8-nbits": 8}
DEFAULT_BLOCK = 32
BLOCK_SIZES = (16, 32, 64, 128, 256)  # what onnxruntime's block quantizer (MLAS) accepts
# QInt8 (signed) weights run onnxruntime's U8S8 kernels. On this x86 CPU (AVX-512 VNNI), Whisper
# tiny.en, 2 threads, QInt8 vs QUInt8: encoder window 584 vs 701 ms, decoder step 3.97 vs 4.38 ms,
# four clips transcribed 2.89 vs 3.46 s (median of 3); the same encoder error (0.087 rel. RMS).
WEIGHT_TYPE = "QInt8"
# Dynamic int8 quantizes a MatMul's activation with one scale for the whole tensor. Whisper's
# activations have a few channels far larger than the rest (tiny.en decoder on real speech: a
# channel maximum of 38 against a median of 2-4 after the layer norms, 22x the row RMS after GELU),
# so that one scale leaves most channels a handful of levels; and in a K-token block one scale
# spans all K rows, so a loud row (the start token) coarsens the others and block and step
# disagree. In the graphs of BLOCKWISE_INT8 the weights named there are 8-bit MatMulNBits at
# accuracy level 4 instead: 8-bit symmetric weights, one fp32 scale per block along K
# (BLOCKWISE_BLOCK; the tied output projection BLOCKWISE_HEAD_BLOCK, whose per-block scales would
# otherwise cost 2.5 MB), and each row's activation quantized to int8 per block, so an outlier
# channel costs only its own block and each row only itself.
# Measured on Whisper tiny.en (tests/benchmarks/whisper_int8_groups.py; README "Why Whisper's
# int8 is partly blockwise"): the decoder's error was spread over every group (logits relative
# RMS on recorded real-speech feeds with only that group int8: output projection 0.042, self
# q/k/v 0.050, self out 0.046, cross q 0.014, cross out 0.037, fc1 0.059, fc2 0.025; all 0.096),
# so no group kept fp32 fits 45 MB. All-dynamic decoder 0.072 -> blockwise layers 0.036 -> with
# the blockwise output projection 0.026; 16-token block vs 16 steps, max logit difference 11.1 ->
# 3.1 -> 0.44. "attention_out" (encoder): its attention output projections (their input, the
# heads' merged output over 1500 frames, fits one scale worst), blockwise instead of fp32 since
# (same cross K/V error, 0.082 vs 0.080 relative RMS, 1.5 MB smaller); every encoder weight
# blockwise would cut that error to 0.023 but makes the encoder 1.8x slower.
BLOCKWISE_INT8 = {"whisper": {"encoder": "attention_out", "decoder": "layers+head"}}
BLOCKWISE_BLOCK = 32
BLOCKWISE_HEAD_BLOCK = 128


class QuantizeError(ExportError):
    """A graph cannot be quantized, or quantization would change its signature."""


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """Replace each ``Transpose(initializer)`` feeding a MatMul/Gemm weight input with a new,
    pre-transposed initializer; drop transposes nobody reads any more. Returns the count folded."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    names = set(inits) | {o for n in graph.node for o in n.output}
    folded: dict[str, str] = {}  # transpose output -> new initializer
    for node in graph.node:
        if node.op_type not in QUANTIZED_OPS or len(node.input) < 2:
            continue
        t = producer.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        if t.output[0] not in folded:
            weight = numpy_helper.to_array(inits[t.input[0]])
            perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
            name = f"{t.input[0]}.transposed"
            while name in names:
                name += "_"
            names.add(name)
            graph.initializer.append(
                numpy_helper.from_array(np.ascontiguousarray(weight.transpose(perm)), name))
            folded[t.output[0]] = name
        node.input[1] = folded[t.output[0]]
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node
            if n.op_type == "Transpose" and n.output[0] in folded and n.output[0] not in read]
    for n in dead:
        graph.node.remove(n)
    for vi in [v for v in graph.value_info if v.name in folded and v.name not in read]:
        graph.value_info.remove(vi)
    return len(folded)


def fp32_matmul_weights(model: onnx.ModelProto, min_elements: int = 0) -> list[tuple[str, int]]:
    """(node name, weight size) of every MatMul/Gemm still reading a float32 weight of at least
    `min_elements`, directly from an initializer or through one Transpose of one."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS or len(node.input) < 2:
            continue
        src = node.input[1]
        if src in producer and producer[src].op_type == "Transpose":
            src = producer[src].input[0]
        init = inits.get(src)
        if init is not None and init.data_type == onnx.TensorProto.FLOAT:
            size = int(np.prod(init.dims))
            if size >= min_elements:
                found.append((node.name, size))
    return found


def attention_output_projections(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMuls with a weight whose activation is an attention's output: through
    Reshape/Transpose (and the Concat of row slices, `attention_rows`) only, a fused
    MultiHeadAttention node or the probabilities-times-values MatMul of two activations (the
    unfused form)."""
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight in producer and producer[weight].op_type == "Transpose":
            weight = producer[weight].input[0]
        if weight not in inits:
            continue
        src = producer.get(node.input[0])
        while src is not None and src.op_type in ("Reshape", "Transpose", "Concat"):
            src = producer.get(src.input[0])
        if src is None:
            continue
        two_activations = src.op_type == "MatMul" and not any(
            i in inits or (i in producer and producer[i].op_type == "Constant")
            for i in src.input)
        if src.op_type in ("MultiHeadAttention", "Attention") or two_activations:
            found.append(node.name)
    return found


def blockwise_int8_nodes(model: onnx.ModelProto, kind: str) -> list[str]:
    """Names of the MatMuls that `BLOCKWISE_INT8`'s `kind` makes blockwise 8-bit: an encoder's
    attention output projections ("attention_out"), every weight MatMul but a tied output
    projection ("layers", also the first part of "layers+head"), or the tied output projection
    ("head"); run after `fold_weight_transposes`."""
    if kind == "attention_out":
        return attention_output_projections(model)
    if kind not in ("layers", "layers+head", "head"):
        raise QuantizeError(f"unknown blockwise int8 selection {kind!r}")
    inits = {i.name for i in model.graph.initializer}
    tied = set(_tied(model).values())
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1
            and n.input[1] in inits and (n.input[1] in tied) == (kind == "head")]


def _head_block(model: onnx.ModelProto, nodes: list[str]) -> int:
    """The largest block up to BLOCKWISE_HEAD_BLOCK that divides the output projection's input
    width (a tiny test model's 64 would otherwise be padded to 128, doubling its bytes)."""
    inits = {i.name: i for i in model.graph.initializer}
    width = min(int(inits[n.input[1]].dims[0]) for n in model.graph.node if n.name in nodes)
    return next((b for b in (BLOCKWISE_HEAD_BLOCK, 64, 32) if width % b == 0), BLOCKWISE_BLOCK)


def _signature(model: onnx.ModelProto) -> list[tuple[str, ...]]:
    """Graph inputs and outputs (initializers excluded) as comparable strings."""
    inits = {i.name for i in model.graph.initializer}
    return [("in", v.SerializeToString(deterministic=True).hex())
            for v in model.graph.input if v.name not in inits] + \
        [("out", v.SerializeToString(deterministic=True).hex()) for v in model.graph.output]


def _tied(model: onnx.ModelProto) -> dict[str, str]:
    """{embedding table: its folded transposed copy} for every Gather of a tied table."""
    inits = {i.name for i in model.graph.initializer}
    return {n.input[0]: f"{n.input[0]}.transposed" for n in model.graph.node
            if n.op_type == "Gather" and f"{n.input[0]}.transposed" in inits}


def _dynamic_int8(model: onnx.ModelProto, folder: Path, weight_type: str,
                  per_channel: bool, exclude: list[str] | None = None) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = weight_bytes(model) > EXTERNAL_THRESHOLD
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=folder) as tmp:
        src, dst = Path(tmp) / "folded.onnx", Path(tmp) / "int8.onnx"
        save_model(model, src)
        quantize_dynamic(src, dst, op_types_to_quantize=list(QUANTIZED_OPS),
                         weight_type=QuantType[weight_type], per_channel=per_channel,
                         reduce_range=False, use_external_data_format=large,
                         nodes_to_exclude=list(exclude or ()),
                         extra_options={"MatMulConstBOnly": True})
        return onnx.load(str(dst))


# MatMulNBits' compute type. 4: activations quantized to int8 per block of a row (fastest on
# CPUs with int8 dot products). 1: weights dequantized, activations stay fp32 (weight-only).
# Per-row int8 activations make a row's result independent of the other rows of a K-token block,
# but not exact: the 1-token and 16-token kernels of the fp32 operators in between (attention,
# layer norm) round differently (1e-6), a value on a rounding boundary of the int8 activation
# then moves by a whole quantization step, and depth amplifies it. moonshine_streaming tiny at
# published width, random weights, 16-token block vs 16 steps: int4 1.7e-2, int8-nbits 1.3e-2
# with level 4; the first differing node is a MatMulNBits whose inputs agree to 1e-6. Graphs that
# run at several token counts (a manifest `dims` axis: the decoder's step and block) therefore
# keep fp32 activations in 4-bit: block and step then differ by fp32 rounding only (1.7e-6 there),
# and the step is faster too (real tiny.en decoder, 2 threads, loaded machine: 16 ms vs 47 ms).
# 8-bit weights have no fast fp32-activation kernel on x86 (the weight is dequantized on every
# call: 1.4 s per step), so a multi-size int8-nbits graph stores each 8-bit weight as two exact
# 4-bit halves run with fp32 activations (`nbits_split`): block and step agree (1.8e-6 on the
# tiny decoder), the weights are the 8-bit values to the bit, the bytes the same count.
ACCURACY_INT8_ACTIVATIONS = 4
ACCURACY_FP32_ACTIVATIONS = 1


def _nbits(model: onnx.ModelProto, bits: int, block: int,
           accuracy_level: int = ACCURACY_INT8_ACTIVATIONS,
           only: list[str] | None = None) -> onnx.ModelProto:
    """MatMulNBits for every weight MatMul, or for the ones named in `only`."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    exclude = None if only is None else [n.name for n in model.graph.node
                                         if n.op_type == "MatMul" and n.name not in only]
    # Symmetric weights: the quantized gather then needs no zero points.
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True,
                             accuracy_level=accuracy_level, nodes_to_exclude=exclude,
                             op_types_to_quantize=("MatMul",))
    q.process()
    return q.model.model


def _batch(n: int) -> int:
    """Calibration outputs held at once (bounds memory). onnxruntime's MinMax calibrator fails
    with "No data is collected" when the feed count is a multiple of it, so pick one that is not."""
    return next((m for m in (8, 7, 6, 5, 3) if n % m), n + 1)


def _static_qdq(model: onnx.ModelProto, folder: Path, feeds: tuple) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, \
        quantize_static

    from edgestream.export.calibration import feed_reader

    large = weight_bytes(model) > EXTERNAL_THRESHOLD
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=folder) as tmp:
        src, dst = Path(tmp) / "folded.onnx", Path(tmp) / "qdq.onnx"
        save_model(model, src)
        # TensorRT takes symmetric int8 (zero point 0) for weights and activations
        quantize_static(src, dst, feed_reader(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
                        reduce_range=False, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=large,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "MatMulConstBOnly": True,
                                       "CalibMaxIntermediateOutputs": _batch(len(feeds))})
        return onnx.load(str(dst))


def _fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    # numerically touchy reductions stay fp32; graph inputs/outputs (the streaming state) too
    keep = [*DEFAULT_OP_BLOCK_LIST, "LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt",
            "Exp", "SimplifiedLayerNormalization", "RMSNormalization", "ReduceSum", "Erf",
            "LogSoftmax", "ReduceLogSumExp"]  # the greedy head's log-probabilities
    return convert_float_to_float16(model, keep_io_types=True, op_block_list=keep)


def quantize_file(path: Path, precision: str = "int8", block_size: int = DEFAULT_BLOCK,
                  weight_type: str = WEIGHT_TYPE, per_channel: bool = True,
                  calibration: tuple = (), exact_rows: bool = False,
                  blockwise: str | None = None) -> dict:
    """Convert one ONNX file to `precision` in place (external data included); returns {folded,
    gathers rewritten, sizes before/after, remaining fp32 MatMul weights}. `per_channel` (int8):
    scales each weight column apart (Whisper tiny.en encoder error 0.069 instead of 0.087
    relative RMS, for about 10 % more encoder time). `calibration` (int8-qdq): this graph's
    recorded feeds (`calibration.record`). `exact_rows` (int4, int8-nbits): the graph runs at
    several token counts (step and block), so its activations stay fp32 (see
    ACCURACY_FP32_ACTIVATIONS; 8-bit weights as two 4-bit halves, `nbits_split`).
    `blockwise` (int8): which weights become 8-bit MatMulNBits with blockwise int8 activations
    (`blockwise_int8_nodes`; see BLOCKWISE_INT8), the rest dynamic int8."""
    if precision not in PRECISIONS or precision == "fp32":
        choices = ", ".join(p for p in PRECISIONS if p != "fp32")
        raise QuantizeError(f"{path}: precision {precision!r} is not one a graph can be "
                            f"converted to; use one of {choices}")
    if precision in NBITS and block_size not in BLOCK_SIZES:
        raise QuantizeError(f"block size {block_size}: MatMulNBits takes one of "
                            f"{', '.join(map(str, BLOCK_SIZES))}")
    path = Path(path)
    before = graph_bytes(path)
    model = onnx.load(str(path))
    signature = _signature(model)
    folded = gathers = blocked = 0
    try:
        if precision == "fp16":
            model = _fp16(model)
        else:
            folded = fold_weight_transposes(model)
            tied = _tied(model)
            if precision == "int8":
                chosen = blockwise_int8_nodes(model, blockwise) if blockwise else []
                if chosen:
                    model = _nbits(model, 8, BLOCKWISE_BLOCK, ACCURACY_INT8_ACTIVATIONS, chosen)
                head = blockwise_int8_nodes(model, "head") if blockwise == "layers+head" else []
                if head:
                    model = _nbits(model, 8, _head_block(model, head), ACCURACY_INT8_ACTIVATIONS,
                                   head)
                blocked = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
                model = _dynamic_int8(model, path.parent, weight_type, per_channel)
            elif precision == "int8-qdq":
                if not calibration:
                    raise QuantizeError(f"{path}: int8-qdq needs calibration feeds for this "
                                        "graph (export.calibration.record)")
                model = _static_qdq(model, path.parent, calibration)
            else:
                model = _nbits(model, NBITS[precision], block_size,
                               ACCURACY_FP32_ACTIVATIONS if exact_rows else
                               ACCURACY_INT8_ACTIVATIONS)
            gathers = rewrite_tied_gathers(model, tied)
            if exact_rows and NBITS.get(precision) == 8:
                split_8bit(model, ACCURACY_FP32_ACTIVATIONS)
    except QuantizeError:
        raise
    except Exception as e:  # onnxruntime's quantizers raise many internal types
        raise QuantizeError(f"{path}: onnxruntime could not convert this graph to {precision} "
                            f"({e})") from e
    if _signature(model) != signature:
        raise QuantizeError(f"{path}: converting to {precision} changed the graph's inputs or "
                            "outputs; the file was left unchanged")
    remaining = fp32_matmul_weights(model)
    save_model(model, path)
    after = graph_bytes(path)
    log.info("%s %s: %.1f -> %.1f MB, %d transposed weight(s) folded, %d tied gather(s) "
             "quantized, %d blockwise int8, %d fp32 MatMul weight(s) left", precision,
             path.name, before / 1e6, after / 1e6, folded, gathers, blocked, len(remaining))
    return {"folded": folded, "quantized_gathers": gathers, "blockwise_int8": blocked,
            "bytes_before": before,
            "bytes_after": after, "fp32_matmul_weights": remaining}


def refresh_entry(entry: dict, folder: Path) -> None:
    """Re-hash a manifest graph entry's file and external data after it was rewritten."""
    entry.pop("external_data", None)
    entry.update(file_hashes(folder / entry["file"]))


def quantize_graphs(folder: Path, manifest: dict, plan: dict[str, str] | tuple[str, ...],
                    block_size: int = DEFAULT_BLOCK, weight_type: str = WEIGHT_TYPE,
                    per_channel: bool = True, calibration_audio: Path | None = None) -> dict:
    """Convert the graphs of `plan` ({graph name: precision}; a tuple of names means int8) in
    place in `folder`. Returns a copy of `manifest` with each converted graph's hashes recomputed
    and ``precision`` (and ``block_size`` for MatMulNBits) set; writing it is the caller's job.
    Inputs and outputs stay identical. int8-qdq calibrates on the clips of
    `calibration_audio`/refs.tsv (default: the project's real clips), transcribed by the fp32
    graphs of `folder` before any of them is converted."""
    if weight_type not in ("QInt8", "QUInt8"):
        raise QuantizeError(f"weight type {weight_type!r} is not supported; use QInt8 or QUInt8")
    if not isinstance(plan, dict):
        plan = {g: "int8" for g in plan}
    folder = Path(folder)
    out = copy.deepcopy(manifest)
    entries = {g["name"]: g for g in out.get("graphs", [])}
    unknown = [g for g in plan if g not in entries]
    if unknown:
        raise QuantizeError(f"{folder}/manifest.json: no graph named {', '.join(unknown)} "
                            f"(graphs: {', '.join(entries)})")
    bad = {g: p for g, p in plan.items() if p not in PRECISIONS}
    if bad:
        raise QuantizeError(f"precision {', '.join(f'{g}={p}' for g, p in bad.items())} is not "
                            f"supported; use one of {', '.join(PRECISIONS)}")
    calibration = None
    if "int8-qdq" in plan.values():
        from edgestream.export.calibration import calibration_clips, record
        from edgestream.export.evaluation import default_eval_dir

        if any(entries[g].get("precision", "fp32") != "fp32" for g in entries):
            raise QuantizeError(f"{folder}: int8-qdq calibrates on the fp32 bundle; convert "
                                "from the fp32 export")
        clips = calibration_clips(Path(calibration_audio or default_eval_dir()))
        calibration = record(folder, clips)
        out.setdefault("calibration", {})["clips"] = [Path(c).name for c in calibration.clips]
    for name, precision in plan.items():
        entry = entries[name]
        path = folder / entry["file"]
        if not path.is_file():
            raise QuantizeError(f"{path}: graph file of graphs[{name}] is missing")
        if precision == "fp32" or entry.get("precision", "fp32") == precision:
            continue
        if entry.get("precision", "fp32") != "fp32":
            raise QuantizeError(f"{path}: graphs[{name}] is already {entry['precision']}; "
                                "convert from the fp32 export")
        if sha256_file(path) != entry.get("sha256"):
            raise QuantizeError(f"{path}: sha256 does not match manifest graphs[{name}].sha256; "
                                "re-export the bundle before quantizing")
        multi_size = any(len(sizes) > 1 for sizes in entry.get("dims", {}).values())
        quantize_file(path, precision, block_size, weight_type, per_channel,
                      calibration.feeds.get(name, ()) if calibration else (), multi_size,
                      BLOCKWISE_INT8.get(out.get("family", ""), {}).get(name))
        refresh_entry(entry, folder)
        entry["precision"] = precision
        if precision in NBITS:
            entry["block_size"] = block_size
            entry["activations"] = "fp32" if multi_size else "int8"
    return out
