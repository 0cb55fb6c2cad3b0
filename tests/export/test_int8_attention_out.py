"""int8 Whisper: the encoder's attention output projections (their 1500-frame input is where one
activation scale per tensor fits worst) and every decoder weight, the tied output projection
included, are blockwise 8-bit MatMulNBits (int8 activations per block of a row, accuracy level 4);
the encoder's other weights are dynamic int8 (MatMulInteger), and no weight stays fp32."""

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
    # no dynamic int8 and no fp32 weight is left in the decoder
    assert _weight_matmuls(decoder) == {}
    # per layer: self q, k, v, out, cross q, cross out, fc1, fc2 in blocks of 32; and the tied
    # output projection after the final layer norm, in blocks of 64 (this model's width; 128 at
    # tiny.en's 384)
    layers = [(x, a) for x, a in _nbits(decoder) if a["N"] != 51864]
    head = [(x, a) for x, a in _nbits(decoder) if a["N"] == 51864]
    assert len(layers) == 8 * DECODER_LAYERS and len(head) == 1
    assert all(tuple(a[k] for k in ("bits", "accuracy_level", "block_size")) == (8, 4, 32)
               for _, a in layers)
    assert tuple(head[0][1][k] for k in ("bits", "accuracy_level", "block_size")) == (8, 4, 64)
    assert producer[head[0][0]].op_type == "LayerNormalization"
    # the embedding gather reads the projection's 8-bit blocks: the vocabulary matrix is stored
    # once, never as an fp32 table
    assert not any(np.prod(i.dims) >= 51864 * 64 and i.data_type == onnx.TensorProto.FLOAT
                   for i in decoder.graph.initializer)
    assert sum(n.op_type == "Gather" for n in decoder.graph.node) >= 1

    # the bundle is valid and its encoder and decoder run
    engine = WhisperEngine(Bundle.open(folder, SessionConfig("cpu")))
    engine.encode(np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1)
    assert np.isfinite(engine.step(engine.prompt[0], 0)).all()
