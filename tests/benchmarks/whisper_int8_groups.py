"""Where Whisper's int8 decoder loses accuracy: the accuracy gate per matmul group (issue 7).

Run as a script: `.venv/bin/python tests/benchmarks/whisper_int8_groups.py FP32_BUNDLE OUT_DIR
[--variants ...] [--windows 48]`. FP32_BUNDLE is a fp32 tiny.en export (`edgestream export
builtin:whisper-tiny.en -o DIR`). Every variant keeps the encoder fp32 (so only the decoder's
quantization is measured) unless its name starts with `enc8:`; the decoder is dynamic int8 (the
`--quantize int8` recipe) except:
- `keep:<group>[,<group>]`: those matmuls stay fp32;
- `only:<group>[,<group>]`: only those matmuls are int8, the rest stay fp32;
- `nbits:<group>[,<group>]`: those matmuls are 8-bit MatMulNBits with int8 activations quantized
  per block of 32 along each row (accuracy level 4) instead of one scale per tensor;
- `smooth:<alpha>`: SmoothQuant rescale (`export.smoothing`) of every LayerNorm-fed matmul before
  dynamic int8;
- `blockwise:<kind>`: `quantize_file(..., "int8", blockwise=kind)` as `--quantize int8` does
  (`layers+head`: today's Whisper decoder; `layers`: the tied projection dynamic).
Groups: lm_head (the tied output projection), qkv, self_out, cross_q, cross_out, fc1, fc2.
Each row is the gate's (`export.evaluation.WhisperEvaluator`): WER over the referenced clips clean
and in three noisy copies, greedy-token agreement over --windows windows, max logit difference,
graphs MB. Accuracy only: timing goes through `bundle_variants.py`.

Measured on tiny.en (load about 3, 48 windows, 748 words; fp32 WER 1.60 %): decoder all dynamic
int8 with the encoder fp32 +0.94 points, agreement 0.977; the output projection kept fp32 +0.67,
0.977. Logits relative RMS on recorded real-speech decoder feeds with only one group dynamic int8
(the rest fp32): output projection 0.042, self q/k/v 0.050, self out 0.046, cross q 0.014, cross
out 0.037, fc1 0.059, fc2 0.025; all of them 0.096; smooth:0.5 0.096, smooth:0.7 0.087: the loss
is spread over every group, so the fix is blockwise activations everywhere (README "Why Whisper's
int8 is partly blockwise"), not one group kept fp32.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import onnx

from edgestream.export.evaluation import WhisperEvaluator, default_eval_dir, load_eval_set
from edgestream.export.onnx_export import save_model
from edgestream.export.quantize import (WEIGHT_TYPE, _dynamic_int8, _tied, fold_weight_transposes,
                                        refresh_entry)
from edgestream.export.qgather import rewrite_tied_gathers

GROUPS = ("lm_head", "qkv", "self_out", "cross_q", "cross_out", "fc1", "fc2")


def decoder_groups(model: onnx.ModelProto) -> dict[str, list[str]]:
    """{group: MatMul node names} of a Whisper decoder graph (fused or not), found by what feeds
    each weight matmul: per layer the self-attention's three projections read the first
    LayerNorm, the cross query the second, fc1 the third; the two attention outputs alternate
    (self, cross); fc2 reads the GELU; the output projection reads the final LayerNorm."""
    from edgestream.export.quantize import attention_output_projections

    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    outs = set(attention_output_projections(model))
    tied = set(_tied(model).values())  # the output projection's folded weight
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    by_norm: dict[str, list[str]] = {}
    norms: list[str] = []
    attn_out: list[str] = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        w = node.input[1]
        if w in tied or w in producer and producer[w].op_type == "Transpose":
            groups["lm_head"].append(node.name)
            continue
        if w not in inits:
            continue
        if node.name in outs:
            attn_out.append(node.name)
            continue
        src = producer.get(node.input[0])
        if src is not None and src.op_type in ("Gelu", "Erf", "Mul"):
            groups["fc2"].append(node.name)
            continue
        if src is not None and src.op_type == "LayerNormalization":
            if src.name not in by_norm:
                norms.append(src.name)
                by_norm[src.name] = []
            by_norm[src.name].append(node.name)
    for i, norm in enumerate(norms):
        groups[("qkv", "cross_q", "fc1")[i % 3]] += by_norm[norm]
    for i, name in enumerate(attn_out):
        groups[("self_out", "cross_out")[i % 2]].append(name)
    return groups


_FEEDS: dict = {}


def decoder_feeds(bundle: Path) -> tuple:
    """The fp32 decoder's inputs while the bundle transcribes the referenced clips (cached)."""
    if bundle not in _FEEDS:
        from edgestream.export.calibration import calibration_clips, record
        _FEEDS[bundle] = record(bundle, calibration_clips(default_eval_dir()), 64).feeds["decoder"]
    return _FEEDS[bundle]


def quantize_decoder(src: Path, dst: Path, variant: str) -> None:
    """Write `src` decoder quantized per `variant` (see the module docstring) to `dst`."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    fold_weight_transposes(model)
    tied = _tied(model)
    groups = decoder_groups(model)
    everything = [n for g in groups.values() for n in g]
    kind, _, arg = variant.removeprefix("enc8:").partition(":")
    keep: list[str] = []
    if kind == "keep":
        keep = [n for g in arg.split(",") for n in groups[g]]
    elif kind == "only":
        chosen = [n for g in arg.split(",") for n in groups[g]]
        keep = [n for n in everything if n not in chosen]
    elif kind == "nbits":
        chosen = [n for g in arg.split(",") for n in groups[g]]
        q = MatMulNBitsQuantizer(model, bits=8, block_size=32, is_symmetric=True,
                                 accuracy_level=4, op_types_to_quantize=("MatMul",),
                                 nodes_to_exclude=[n for n in everything if n not in chosen])
        q.process()
        model = q.model.model
    elif kind == "smooth":
        from edgestream.export.smoothing import (activation_maxima, smooth_layer_norms,
                                                 smooth_targets)
        skip = frozenset(tied.values())
        outs = [t.output for t in smooth_targets(model, skip)]
        smooth_layer_norms(model, activation_maxima(model, decoder_feeds(src.parent), outs),
                           float(arg), skip)
    elif kind == "blockwise":
        from edgestream.export.quantize import quantize_file
        shutil.copy(src, dst)
        quantize_file(dst, "int8", blockwise=arg)
        return
    elif kind != "int8":
        raise SystemExit(f"unknown variant {variant!r}")
    model = _dynamic_int8(model, dst.parent, WEIGHT_TYPE, True, keep)
    rewrite_tied_gathers(model, tied)
    save_model(model, dst)


def build(fp32: Path, int8_encoder: Path | None, folder: Path, variant: str) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(fp32, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    entries = {g["name"]: g for g in manifest["graphs"]}
    quantize_decoder(fp32 / entries["decoder"]["file"], folder / entries["decoder"]["file"],
                     variant)
    refresh_entry(entries["decoder"], folder)
    entries["decoder"]["precision"] = "int8"
    if variant.startswith("enc8:"):
        shutil.copy(int8_encoder, folder / entries["encoder"]["file"])
        refresh_entry(entries["encoder"], folder)
        entries["encoder"]["precision"] = "int8"
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("fp32", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--int8-encoder", type=Path, help="an int8 bundle's encoder.onnx (enc8:)")
    p.add_argument("--variants", nargs="+",
                   default=["int8", *(f"keep:{g}" for g in GROUPS)])
    p.add_argument("--windows", type=int, default=48)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    ev = WhisperEvaluator(args.fp32, load_eval_set(default_eval_dir(), max_windows=args.windows))
    print(f"fp32 reference: WER {ev.ref_wer:.2f} % over {ev.data.wer_words} words "
          f"({time.time() - t:.0f} s)", flush=True)
    for v in args.variants:
        t = time.time()
        folder = build(args.fp32, args.int8_encoder, args.out / v.replace(":", "_").replace(
            ",", "+"), v)
        r = ev.measure(folder, v, {})
        print(json.dumps({"variant": v, "wer": r.wer, "wer_delta": r.wer_delta,
                          "agreement": r.agreement, "identical": r.identical_windows,
                          "max_logit_diff": round(r.max_logit_diff, 3), "size_mb": r.size_mb,
                          "seconds": round(time.time() - t)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
