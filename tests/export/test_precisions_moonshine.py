"""moonshine_streaming precisions: the accuracy gate decides on many windows (the real clips cut
into overlapping windows, the synthetic clips, the same audio with noise), like Whisper's; a
too-coarse variant is rejected with the table and nothing is written; an 8-bit variant whose
decoder keeps fp32 activations ships with exact re-scoring (block and step logits within 1e-4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgestream.export import gate
from edgestream.export.build import ExportOptions, export_bundle
from edgestream.export.gate import format_table
from edgestream.runtime.bundle import Bundle

WINDOWS = 16  # enough for the tiny random model; the default (300) is for real exports


def test_moonshine_gate_rejects_a_coarse_variant_and_ships_exact_int8(
        tiny_moonshine_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--quantize auto` with two candidates on the tiny random model, blocks of 16:
    - int4 everywhere keeps about 60 % of fp32's greedy tokens (4-bit steps on unit-scale random
      weights are coarse): the gate rejects it by agreement over the windows;
    - 8-bit blocks keep about 98 %: encoder and memory run at one size, so int8 activations per
      row there; the decoder runs at 1 and K tokens, so 8-bit weights with fp32 activations,
      and a K-token block and K steps agree (exact re-scoring). It ships with the table.
    The random model's WER is meaningless (both transcripts are noise): gated on agreement."""
    exact8 = "encoder=int8-nbits,memory=int8-nbits,decoder=int8-nbits"
    assert "encoder=int8,memory=int8,decoder=int8-nbits" in gate.AUTO_BY_FAMILY[
        "moonshine_streaming"]["cpu"]  # the real auto list holds an exact 8-bit decoder
    monkeypatch.setitem(gate.AUTO_BY_FAMILY["moonshine_streaming"], "cpu", ("int4", exact8))
    out = tmp_path / "out"
    export_bundle(ExportOptions(str(tiny_moonshine_dir), out, vad="none", quantize="auto",
                                block_size=16, eval_windows=WINDOWS, min_agreement=0.9,
                                wer_budget=1000.0, eval_wer_copies=0))
    data = json.loads((out / "manifest.json").read_text())
    acc = data["accuracy"]
    assert acc["windows"] == WINDOWS and acc["eval_audio"]
    fp32, int4, int8 = acc["rows"]
    assert [r["variant"] for r in acc["rows"]] == ["fp32", "int4", exact8]
    assert fp32["agreement"] == 1.0 and fp32["max_logit_diff"] == 0.0
    assert not int4["passed"] and "agreement" in int4["reason"] and int4["agreement"] < 0.9
    assert int4["windows"] == WINDOWS and int4["positions"] > 10 * WINDOWS
    assert int4["max_logit_diff"] > 0.1 and int4["size_mb"] < fp32["size_mb"]
    assert acc["chosen"] == exact8
    assert int8["passed"] and int8["agreement"] >= 0.9 and int8["positions"] > 10 * WINDOWS
    assert fp32["block_step_diff"] <= 1e-4 and int8["block_step_diff"] <= 1e-4
    assert 0 < int8["max_logit_diff"] < int4["max_logit_diff"]
    assert int8["size_mb"] < fp32["size_mb"] and int8["step_ms"] > 0 and int8["encode_ms"] > 0
    assert "no: agreement" in format_table(acc["rows"])
    graphs = {g["name"]: (g["precision"], g.get("activations")) for g in data["graphs"]}
    assert graphs == {"encoder": ("int8-nbits", "int8"), "memory": ("int8-nbits", "int8"),
                      "decoder": ("int8-nbits", "fp32")}
    Bundle.open(out)
    assert not list(tmp_path.glob(".out.*"))
