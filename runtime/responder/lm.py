"""A `decoder_lm` bundle opened for the device: manifest, hashes, tokenizer and ONE onnxruntime
session that serves both the one-token step and the K-token chunk (the graph's token axis is its
only symbolic dimension), so the weights are resident once."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from edgestream.runtime.bundle import check_graph_files
from edgestream.runtime.errors import BundleError
from edgestream.runtime.manifest import MANIFEST_NAME, Manifest, load_manifest
from edgestream.runtime.responder.spec import LMSpec, parse_lm_spec
from edgestream.runtime.session import GraphSession, SessionConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LanguageModel:
    """A validated LM bundle: its spec, the shared session and the tokenizer."""

    root: Path
    manifest: Manifest
    spec: LMSpec
    session: GraphSession
    tokenizer: Tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (chat pieces carry their special tokens as text)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_lm(root: str | Path, provider: str = "auto", threads: int = 0) -> LanguageModel:
    """Open and check an LM bundle; a speech bundle here is refused, naming what it is."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"{root}: LM bundle folder not found; create one with `edgestream "
                          "export builtin:smollm2-135m-instruct -o DIR`")
    manifest = load_manifest(root)
    spec = parse_lm_spec(manifest, str(root))
    step, chunk = manifest.graph("step"), manifest.graph("chunk")
    if step.file != chunk.file:
        raise BundleError(f"{root}/{MANIFEST_NAME}: graphs step and chunk must share one file "
                          f"(got {step.file}, {chunk.file}); re-export the bundle")
    path = root / step.file
    if (step.sha256, step.external_data) != (chunk.sha256, chunk.external_data):
        raise BundleError(f"{root}/{MANIFEST_NAME}: graphs step and chunk list different hashes "
                          f"for the one file {step.file}; re-export the bundle")
    check_graph_files(root, step)
    tok_path = root / manifest.tokenizer.file
    try:
        tokenizer = Tokenizer.from_file(str(tok_path))
    except Exception as e:  # tokenizers raises its own exception type
        raise BundleError(f"{tok_path}: not a readable tokenizers file ({e}); re-export") from e
    # weights packed for huge pages: a decode step reads all of them (runtime/huge_pages.py)
    session = GraphSession(path, step, SessionConfig(provider, threads), pack_weights=True)
    # the chunk is the same file at another size: its declared signature must fit it too
    session._check(session.session.get_inputs(), chunk.inputs, "input")
    session._check(session.session.get_outputs(), chunk.outputs, "output")
    log.info("LM bundle %s: %s, %d attention layers, %d KV slots, chunk %d", root,
             manifest.family, len(spec.kv), spec.kv_slots, spec.chunk_tokens)
    return LanguageModel(root, manifest, spec, session, tokenizer)
