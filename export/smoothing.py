"""SmoothQuant-style rescaling of LayerNorm-fed matmuls before dynamic int8 (exact in fp32).

Dynamic int8 quantizes a matmul's activation with one scale for the whole tensor. Whisper's hidden
states have a few channels tens of times larger than the rest (tiny.en decoder, LayerNorm outputs
on real speech: channel maxima up to 38 against a median of 2-4), so that one scale leaves the
other channels a handful of int8 levels. A LayerNorm's output channel k feeds row k of every
weight that reads it, so dividing the LayerNorm's gamma and beta by s_k and multiplying those
weight rows by s_k leaves the fp32 graph's function unchanged (up to float rounding) while it
moves range from the activation, quantized per tensor, into the weight, quantized per output
column: s_k = amax_k^alpha / wmax_k^(1-alpha) (Xiao et al., SmoothQuant, 2022), amax_k measured on
real speech (`activation_maxima`), wmax_k the largest |weight| of row k over the readers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.5


@dataclass(frozen=True)
class SmoothTarget:
    """One LayerNorm whose output only weight matmuls read: the tensor and who reads it."""

    norm: str  # node name
    output: str  # the normalised tensor
    scale: str  # gamma initializer
    bias: str | None  # beta initializer
    weights: tuple[str, ...]  # [K, N] initializers of the MatMuls reading `output`


def smooth_targets(model: onnx.ModelProto, skip: frozenset[str] = frozenset()
                   ) -> list[SmoothTarget]:
    """LayerNorms (normalising the last axis) whose output is read only by MatMuls with an
    initializer weight, each gamma, beta and weight used by that node alone and no weight in
    `skip` (a tied output projection, whose bytes the embedding gather reads too): the places
    where the rescale can be folded exactly."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    found = []
    for n in g.node:
        if n.op_type != "LayerNormalization" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), -1)
        if axis != -1:
            continue
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if bias is not None and bias not in inits:
            continue
        if any(len(readers.get(p, [])) != 1 for p in (n.input[1], bias) if p):
            continue
        out = n.output[0]
        users = readers.get(out, [])
        if not users or out in outputs or any(
                u.op_type != "MatMul" or u.input[0] != out or u.input[1] not in inits
                or len(inits[u.input[1]].dims) != 2 or u.input[1] in skip
                or len(readers[u.input[1]]) != 1 for u in users):
            continue
        found.append(SmoothTarget(n.name, out, n.input[1], bias,
                                  tuple(u.input[1] for u in users)))
    return found


def activation_maxima(model: onnx.ModelProto, feeds: tuple[dict[str, np.ndarray], ...],
                      tensors: list[str]) -> dict[str, np.ndarray]:
    """Per-channel max |value| of `tensors` (last axis) over the graph run on `feeds`."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for t in tensors:
        if t not in have:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    maxima: dict[str, np.ndarray] = {}
    for feed in feeds:
        got = dict(zip(tensors, session.run(tensors, feed)))
        for t in tensors:
            a = np.abs(got[t]).reshape(-1, got[t].shape[-1]).max(0)
            maxima[t] = a if t not in maxima else np.maximum(maxima[t], a)
    return maxima


def smooth_layer_norms(model: onnx.ModelProto, maxima: dict[str, np.ndarray],
                       alpha: float = DEFAULT_ALPHA, skip: frozenset[str] = frozenset()) -> int:
    """Fold s_k = amax_k^alpha / wmax_k^(1-alpha) into every `smooth_targets` LayerNorm (gamma,
    beta / s) and its readers' weight rows (* s), in place. `maxima`: {LayerNorm output:
    per-channel max |activation|} (`activation_maxima`); a target without one is left alone.
    Returns the count of LayerNorms rescaled."""
    inits = {i.name: i for i in model.graph.initializer}
    done = 0
    for t in smooth_targets(model, skip):
        amax = maxima.get(t.output)
        if amax is None:
            continue
        weights = {w: numpy_helper.to_array(inits[w]) for w in t.weights}
        wmax = np.max([np.abs(w).max(1) for w in weights.values()], axis=0)
        s = np.power(np.maximum(amax, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
        s = (s / np.exp(np.mean(np.log(s)))).astype(np.float32)  # geometric mean 1: same scale
        for name in (t.scale, t.bias):
            if name is None:
                continue
            value = numpy_helper.to_array(inits[name])
            inits[name].CopyFrom(numpy_helper.from_array((value / s).astype(np.float32), name))
        for name, w in weights.items():
            inits[name].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32),
                                                         name))
        done += 1
    log.info("smoothing: %d LayerNorm(s) rescaled (alpha %.2f)", done, alpha)
    return done
