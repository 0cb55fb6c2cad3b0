"""Dynamic int8 quantization of a bundle's graphs, in place: MatMul/Gemm weights only.

Convolution front ends stay fp32 (dynamic int8 of the conv front end is slower, DESIGN.md 8), as do
attention matmuls between two activations. Whisper's tied output projection is exported as
``MatMul(x, Transpose(embedding))``; ``quantize_dynamic`` only quantizes a weight that is an
initializer, so it would silently leave the largest decoder matmul in fp32. The transpose is
folded into a new initializer first; the embedding ``Gather`` keeps reading the original.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgestream.export.errors import ExportError
from edgestream.runtime.bundle import sha256_file

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("MatMul", "Gemm")
# onnx.save's protobuf limit; below it the quantized graph is written as one file
PROTOBUF_LIMIT = 2**31 - 1
# QInt8 (signed) weights run onnxruntime's U8S8 kernels. On this x86 CPU (AVX-512 VNNI), Whisper
# tiny.en, 2 threads, QInt8 vs QUInt8: encoder window 584 vs 701 ms, decoder step 3.97 vs 4.38 ms,
# four clips transcribed 2.89 vs 3.46 s (median of 3); the same encoder error (0.087 rel. RMS).
WEIGHT_TYPE = "QInt8"


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


def _signature(model: onnx.ModelProto) -> list[tuple[str, ...]]:
    """Graph inputs and outputs (initializers excluded) as comparable strings."""
    inits = {i.name for i in model.graph.initializer}
    return [("in", v.SerializeToString(deterministic=True).hex())
            for v in model.graph.input if v.name not in inits] + \
        [("out", v.SerializeToString(deterministic=True).hex()) for v in model.graph.output]


def _save(model: onnx.ModelProto, path: Path) -> None:
    large = sum(len(i.raw_data) for i in model.graph.initializer) > PROTOBUF_LIMIT
    onnx.save_model(model, str(path), save_as_external_data=large,
                    location=f"{path.name}.data" if large else None)


def quantize_file(path: Path, weight_type: str = WEIGHT_TYPE, per_channel: bool = False) -> dict:
    """Quantize one ONNX file in place; returns {folded, sizes before/after, remaining fp32}.
    `per_channel` scales each weight column apart: Whisper tiny.en encoder error 0.069 instead
    of 0.087 relative RMS, for about 10 % more encoder time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    before = path.stat().st_size
    model = onnx.load(str(path))
    signature = _signature(model)
    folded = fold_weight_transposes(model)
    large = sum(len(i.raw_data) for i in model.graph.initializer) > PROTOBUF_LIMIT
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=path.parent) as tmp:
        src, dst = Path(tmp) / "folded.onnx", Path(tmp) / "int8.onnx"
        _save(model, src)
        del model
        try:
            quantize_dynamic(src, dst, op_types_to_quantize=list(QUANTIZED_OPS),
                             weight_type=QuantType[weight_type], per_channel=per_channel,
                             reduce_range=False, use_external_data_format=large,
                             extra_options={"MatMulConstBOnly": True})
        except Exception as e:  # onnxruntime's quantizer raises many internal types
            raise QuantizeError(f"{path}: onnxruntime quantize_dynamic failed ({e})") from e
        quantized = onnx.load(str(dst))
        if _signature(quantized) != signature:
            raise QuantizeError(f"{path}: quantization changed the graph's inputs or outputs; "
                                "the file was left unchanged")
        remaining = fp32_matmul_weights(quantized)
        if large:
            _save(quantized, path)
        else:
            os.replace(dst, path)
    after = path.stat().st_size
    log.info("quantized %s: %.1f -> %.1f MB, %d transposed weight(s) folded, %d fp32 MatMul "
             "weight(s) left", path.name, before / 1e6, after / 1e6, folded, len(remaining))
    return {"folded": folded, "bytes_before": before, "bytes_after": after,
            "fp32_matmul_weights": remaining}


def quantize_graphs(folder: Path, manifest: dict, graphs: tuple[str, ...],
                    mode: str = "int8", weight_type: str = WEIGHT_TYPE,
                    per_channel: bool = False) -> dict:
    """Dynamic int8 of the MatMul/Gemm weights of the graphs named in `graphs` (manifest graph
    names), in place in `folder`. Returns a copy of `manifest` with each quantized graph's
    ``sha256`` recomputed and ``precision`` set to "int8"; writing it is the caller's job.
    Inputs and outputs stay identical. A tied embedding stays fp32 for its Gather beside the
    int8 projection, so a decoder whose vocabulary matrix dominates barely shrinks (or grows)."""
    if mode != "int8":
        raise QuantizeError(f"quantization mode {mode!r} is not supported; use 'int8'")
    if weight_type not in ("QInt8", "QUInt8"):
        raise QuantizeError(f"weight type {weight_type!r} is not supported; use QInt8 or QUInt8")
    folder = Path(folder)
    out = copy.deepcopy(manifest)
    entries = {g["name"]: g for g in out.get("graphs", [])}
    unknown = [g for g in graphs if g not in entries]
    if unknown:
        raise QuantizeError(f"{folder}/manifest.json: no graph named {', '.join(unknown)} "
                            f"(graphs: {', '.join(entries)})")
    for name in graphs:
        entry = entries[name]
        path = folder / entry["file"]
        if not path.is_file():
            raise QuantizeError(f"{path}: graph file of graphs[{name}] is missing")
        if entry.get("precision") == "int8":
            log.info("%s is already int8; left as it is", path.name)
            continue
        if sha256_file(path) != entry.get("sha256"):
            raise QuantizeError(f"{path}: sha256 does not match manifest graphs[{name}].sha256; "
                                "re-export the bundle before quantizing")
        quantize_file(path, weight_type, per_channel)
        entry["sha256"] = sha256_file(path)
        entry["precision"] = "int8"
    return out
