"""Perplexity after the ring wraps, on a long text that does not repeat (issue 10).

Run: `.venv/bin/python tests/benchmarks/lm_wrap_ppl.py --lm LM_BUNDLE [--text FILE]`
(default text: the GNU GPL v3 from Debian's /usr/share/common-licenses, about 8000 tokens of
plain English that never repeats; it is read at run time, not stored in the project).

The first kv_slots + 512 tokens of the text go through our bundle's engine with 4 sink slots
(chunks and single steps mixed, as a conversation feeds them), so the ring wraps after about
kv_slots tokens. Perplexity over the positions past the window, against transformers (fp32, the
same GGUF weights) over the same tokens with the same sink + window mask and with full attention:
the first ratio is what the ring costs the model, the second adds our precision.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np

SINKS = 4
EXTRA = 512


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lm", type=Path, required=True)
    ap.add_argument("--text", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    args = ap.parse_args()
    import torch

    from edgestream.export.lm.parity import _window_mask, feed_mixed
    from edgestream.runtime.responder import load_lm
    from edgestream.runtime.responder.engine import LMEngine

    from lm_decode import hf_model_and_ids  # this folder is on sys.path when run as a script

    lm = load_lm(args.lm, provider="cpu")
    text = " ".join(args.text.read_text().split())  # one paragraph: no layout tokens
    ids = lm.encode(text)[: lm.spec.kv_slots + EXTRA]
    if len(set(ids)) < len(ids) // 4:
        raise SystemExit(f"{args.text}: too repetitive for this check")
    engine = LMEngine(lm, pinned=SINKS)
    window = engine.kv.window
    ours = feed_mixed(engine, ids)
    model = hf_model_and_ids()[0]
    with torch.no_grad():
        x = torch.tensor([ids])
        ring = model(x, attention_mask=_window_mask(len(ids), SINKS, window)).logits[0].numpy()
        full = model(x).logits[0].numpy()
    after = slice(window, len(ids) - 1)
    target = torch.tensor(ids[after.start + 1:])

    def ppl(logits: np.ndarray) -> float:
        return round(math.exp(float(torch.nn.functional.cross_entropy(
            torch.from_numpy(logits[after]).float(), target))), 3)

    report = {"text": str(args.text), "tokens": len(ids), "kv_slots": lm.spec.kv_slots,
              "sinks": SINKS, "window": window, "positions_scored": after.stop - after.start,
              "precision": lm.manifest.graphs[0].precision,
              "ppl_transformers_full_attention": ppl(full),
              "ppl_transformers_sinks_window": ppl(ring), "ppl_ours_ring": ppl(ours),
              "load": round(os.getloadavg()[0], 2)}
    report["ring_cost"] = round(report["ppl_transformers_sinks_window"] /
                                report["ppl_transformers_full_attention"], 3)
    report["ours_over_full"] = round(report["ppl_ours_ring"] /
                                     report["ppl_transformers_full_attention"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
