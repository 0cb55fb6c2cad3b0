"""int8 Whisper: the encoder's attention output projections (their 1500-frame input is where one
activation scale per tensor fits worst) and every weight of the decoder's layers are blockwise
8-bit MatMulNBits (int8 activations per block of a row, accuracy level 4); the encoder's other
weights and the tied output projection are dynamic int8 (MatMulInteger), and no weight stays
fp32."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx

from edgestream.export.quantize import quantize_graphs
from edgestream.runtime.bundle import Bundle
from edgestream.runtime.families.whisper.engine import WhisperEngine
from edgestream.runtime.session import SessionConfig

ENCODER_LAYERS = DECODER_LAYERS = 2  # tests/conftest.py's tiny Whisper config


def _weight_matmuls(model: onnx.ModelProto) -> dict[str, list[str]]:
    """{op type: [activation input]} of the MatMul/MatMulInteger nodes reading an initializer."""
    inits = {i.name for i in model.graph.initializer}
    found: dict[str, list[str]] = {}
    for n in model.graph.node:
        if n.op_type in ("MatMul", "MatMulInteger") and n.input[1] in inits:
            found.setdefault(n.op_type, []).append(n.input[0])
    return found


def _nbits(model: onnx.ModelProto) -> list[tuple[str, dict]]:
    """(activation input, attributes) of every MatMulNBits node."""
    return [(n.input[0], {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})
            for n in model.graph.node if n.op_type == "MatMulNBits"]


def test_int8_blockwise_where_one_scale_fits_worst(tiny_bundle: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_bundle, tmp_path / "int8"))
    manifest = json.loads((folder / "manifest.json").read_text())
    out = quantize_graphs(folder, manifest, ("encoder", "decoder"))
    (folder / "manifest.json").write_text(json.dumps(out, indent=2) + "\n")

    encoder = onnx.load(str(folder / "encoder.onnx"))
    producer = {o: n for n in encoder.graph.node for o in n.output}
    blockwise = _nbits(encoder)
    # one per encoder layer, each reading a fused attention's output
    assert len(blockwise) == ENCODER_LAYERS
    assert all(producer[x].op_type == "MultiHeadAttention" for x, _ in blockwise)
    assert all(a["bits"] == 8 and a["accuracy_level"] == 4 and a["block_size"] == 32
               for _, a in blockwise)
    assert "MatMul" not in _weight_matmuls(encoder)
    # q, k, v, fc1, fc2 per layer and the decoder's cross K/V projections stay dynamic int8
    assert len(_weight_matmuls(encoder)["MatMulInteger"]) >= 5 * ENCODER_LAYERS

    decoder = onnx.load(str(folder / "decoder.onnx"))
    producer = {o: n for n in decoder.graph.node for o in n.output}
    # per layer: self q, k, v, out, cross q, cross out, fc1, fc2
    assert len(_nbits(decoder)) == 8 * DECODER_LAYERS
    assert all(a["bits"] == 8 and a["accuracy_level"] == 4 for _, a in _nbits(decoder))
    # the tied output projection alone stays dynamic int8 (its per-row scales are what the
    # quantized embedding gather reads), after the final layer norm
    dynamic = _weight_matmuls(decoder)
    assert "MatMul" not in dynamic
    assert len(dynamic["MatMulInteger"]) == 1
    x = dynamic["MatMulInteger"][0]
    while producer[x].op_type != "LayerNormalization":
        x = producer[x].input[0]
    # and the vocabulary matrix is stored once, never as an fp32 table
    assert not any(51864 in i.dims and len(i.dims) == 2 and i.data_type == onnx.TensorProto.FLOAT
                   for i in decoder.graph.initializer)

    # the bundle is valid and its encoder and decoder run
    engine = WhisperEngine(Bundle.open(folder, SessionConfig("cpu")))
    engine.encode(np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1)
    assert np.isfinite(engine.step(engine.prompt[0], 0)).all()
