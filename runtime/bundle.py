"""Open a bundle folder: manifest, file hashes, sessions and their signatures, all checked
before any audio is read."""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from edgestream.runtime.errors import BundleError
from edgestream.runtime.manifest import MANIFEST_NAME, GraphSpec, Manifest, load_manifest
from edgestream.runtime.memory import return_large_blocks
from edgestream.runtime.session import GraphSession, SessionConfig
from edgestream.runtime.token_table import BundleTokenizer

log = logging.getLogger(__name__)

# Graphs that run once per long window with large activations: their CPU arena hands its free
# blocks back after each run (`GraphSession`'s `shrink_arena`), so the encoder's activations
# (about 34 MB for Whisper tiny.en) are not resident beside the decoder's.
SELDOM_RUN: dict[str, tuple[str, ...]] = {"whisper_window": ("encoder",)}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_file(path: Path, expected: str, field: str, what: str) -> None:
    if not path.is_file():
        raise BundleError(f"{path}: {what} listed in {MANIFEST_NAME} ({field}.file) is missing; "
                          "re-export the bundle")
    digest = sha256_file(path)
    if digest != expected:
        raise BundleError(f"{path}: sha256 {digest[:12]}... does not match {MANIFEST_NAME} "
                          f"{field}.sha256 {expected[:12]}...; the file was changed or damaged, "
                          "re-export the bundle")


def check_graph_files(root: Path, g: GraphSpec) -> None:
    """Check a graph file and its external data against the manifest's hashes. The .onnx names
    its external-data files, so its hash covers the references and these cover the weights."""
    check_file(root / g.file, g.sha256, f"graphs[{g.name}]", "graph file")
    for j, d in enumerate(g.external_data):
        check_file(root / d.file, d.sha256, f"graphs[{g.name}].external_data[{j}]",
                   "external-data file")


@dataclass(frozen=True)
class Bundle:
    """A validated bundle: its folder, manifest, one session per graph, the tokenizer path."""

    root: Path
    manifest: Manifest
    sessions: dict[str, GraphSession]
    tokenizer_path: Path
    tokenizer: BundleTokenizer

    @classmethod
    def open(cls, root: Path, config: SessionConfig | None = None) -> "Bundle":
        root = Path(root)
        if not root.is_dir():
            raise BundleError(f"{root}: bundle folder not found; create one with "
                              "`edgestream export SOURCE -o DIR`")
        manifest = load_manifest(root)
        for g in manifest.graphs:
            check_graph_files(root, g)
        tok = root / manifest.tokenizer.file
        if not tok.is_file():
            raise BundleError(f"{tok}: tokenizer file named in {MANIFEST_NAME} tokenizer.file "
                              "is missing; re-export the bundle")
        if manifest.tokenizer.sha256:
            check_file(tok, manifest.tokenizer.sha256, "tokenizer", "tokenizer file")
        return_large_blocks()  # before the large transients of parsing and loading
        # a compact id -> bytes table; the full tokenizers.Tokenizer only when text is encoded
        tokenizer = BundleTokenizer(tok)
        cfg = config or SessionConfig()
        # the Silero VAD graph is tiny and runs every chunk: on a GPU its launches and copies
        # would cost more than its compute, so it stays on the CPU. Its session opens on first
        # use (a stream with vad silero): whole-file transcription never runs it.
        vad = {g.name: g for g in manifest.graphs if g.name == manifest.vad}
        sessions = LazySessions(root, vad, cfg.on_cpu())
        seldom = SELDOM_RUN.get(manifest.pipeline, ())
        for g in manifest.graphs:
            if g.name != manifest.vad:
                sessions[g.name] = GraphSession(root / g.file, g, cfg,
                                                shrink_arena=g.name in seldom)
        log.info("bundle %s: %s/%s, %d graphs, %d states", root, manifest.family,
                 manifest.pipeline, len(manifest.graphs), len(manifest.states))
        return cls(root, manifest, sessions, tok, tokenizer)


class LazySessions(dict):
    """Graph name -> GraphSession; the graphs in `lazy` open on first lookup by name (`[]`).
    Until then they are not in the mapping (`in`, iteration and `get` do not see them)."""

    def __init__(self, root: Path, lazy: dict[str, GraphSpec], config: SessionConfig) -> None:
        super().__init__()
        self._root, self._lazy, self._config = root, lazy, config
        self._lock = threading.Lock()

    def __missing__(self, name: str) -> GraphSession:
        with self._lock:
            if name in self:  # another thread opened it meanwhile
                return dict.__getitem__(self, name)
            spec = self._lazy.get(name)
            if spec is None:
                raise KeyError(name)
            session = GraphSession(self._root / spec.file, spec, self._config)
            self[name] = session
            return session
