"""A bundle's tokenizer at the memory a device can spare.

Speech decoding only turns ids back into text. For byte-level BPE vocabularies (Whisper's, GPT-2's)
that needs no BPE model: each id stands for a fixed byte string, and a text is the UTF-8 decoding of
their concatenation. `TokenTable` keeps just that: every id's bytes in one blob with offsets (about
half a megabyte for Whisper's 51k ids, where a `tokenizers.Tokenizer` holds some 20 MB). The full
`tokenizers.Tokenizer` is built from the same file only when text must be encoded (a user prompt,
a test), or when the file's decoder is not byte-level (then it is built at once).
"""

from __future__ import annotations

import json
from array import array
from bisect import bisect_left
from pathlib import Path
from typing import Any, Sequence

from edgestream.runtime.errors import BundleError


def _byte_translation() -> dict[int, str]:
    """Byte-level BPE writes each byte as a printable character: printable Latin-1 bytes as
    themselves, the other bytes as code points from 256 on, in order. This maps each such
    character back to the Latin-1 character of its byte, and every other character below 256 to
    one that Latin-1 cannot encode (a token holding it is not in the byte alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    back = {c: chr(c) for c in keep}
    extra = 0
    for b in range(256):
        if b not in back:
            back[256 + extra] = chr(b)
            back[b] = "\uffff"
            extra += 1
    return back


def _token_bytes(token: str, table: dict[int, str]) -> bytes:
    """The bytes a token stands for; a token with a character outside the byte alphabet (an
    added token written as plain text) stands for its own UTF-8, as `tokenizers` decodes it."""
    try:
        return token.translate(table).encode("latin-1")
    except UnicodeEncodeError:
        return token.encode("utf-8")


class TokenTable:
    """id -> bytes and id -> token text of a byte-level BPE vocabulary, plus the ids of its
    special added tokens (skipped when decoding, like `tokenizers`' `skip_special_tokens`)."""

    def __init__(self, tokens: dict[int, str], special: set[int]) -> None:
        table = _byte_translation()
        size = max(tokens) + 1 if tokens else 0
        # built piece by piece into two buffers: no per-token lists beside the parsed file
        blob, texts = bytearray(), bytearray()
        self._at, self._text_at = array("q", [0]), array("q", [0])
        for i in range(size):
            t = tokens.get(i, "")
            blob += _token_bytes(t, table)
            texts += t.encode("utf-8")
            self._at.append(len(blob))
            self._text_at.append(len(texts))
        self._bytes, self._texts = bytes(blob), bytes(texts)
        self._known = bytes(int(i in tokens) for i in range(size))
        self._special = frozenset(special)

    @property
    def size(self) -> int:
        return len(self._known)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`; ids outside the vocabulary are ignored, as `tokenizers` does."""
        at, blob, known, n = self._at, self._bytes, self._known, len(self._known)
        skip = self._special if skip_special_tokens else frozenset()
        out = b"".join(blob[at[i]: at[i + 1]] for i in map(int, ids)
                       if 0 <= i < n and known[i] and i not in skip)
        return out.decode("utf-8", errors="replace")

    def id_to_token(self, i: int) -> str | None:
        i = int(i)
        if not (0 <= i < len(self._known) and self._known[i]):
            return None
        return self._texts[self._text_at[i]: self._text_at[i + 1]].decode("utf-8")

    def token_to_id(self, token: str) -> int | None:
        """The id of a token text (a search of the text blob: no 50k-entry dict kept)."""
        want = token.encode("utf-8")
        if not want:
            return None
        at, start = self._text_at, 0
        while (found := self._texts.find(want, start)) >= 0:
            i = bisect_left(at, found)
            while i < len(at) - 1 and at[i] == found:  # empty (unknown) ids share an offset
                if at[i + 1] - found == len(want) and self._known[i]:
                    return i
                i += 1
            start = found + 1
        return None


def read_token_table(path: Path) -> TokenTable | None:
    """The compact table of a `tokenizers` JSON file, or None when its decoder is not byte-level
    BPE (the full tokenizer is needed then). Raises BundleError on a file that is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
        model.pop("merges", None)  # half the parse; decoding needs none of it
        decoder = data.get("decoder") or {}
        added = data.get("added_tokens") or []
        if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
            return None
        tokens = {int(i): str(t) for t, i in model["vocab"].items()}
        special = set()
        for a in added:
            tokens[int(a["id"])] = str(a["content"])
            if a.get("special"):
                special.add(int(a["id"]))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BundleError(f"{path}: not a readable tokenizers file ({e}); re-export the "
                          "bundle") from e
    return TokenTable(tokens, special)


class BundleTokenizer:
    """The tokenizer a bundle's engines use: `decode`, `id_to_token` and special-token lookups
    from a `TokenTable` when the vocabulary allows it; everything else (and every call, for other
    vocabularies) from a `tokenizers.Tokenizer` built on first use."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.table = read_token_table(self.path)
        self._full: Any = None
        if self.table is None:
            self.full  # not byte-level: build it now, so a bad file fails at load

    @property
    def full(self) -> Any:
        """The `tokenizers.Tokenizer` of the file (built once, on first use)."""
        if self._full is None:
            from tokenizers import Tokenizer

            try:
                self._full = Tokenizer.from_file(str(self.path))
            except Exception as e:  # tokenizers raises its own exception type
                raise BundleError(f"{self.path}: not a readable tokenizers file ({e}); "
                                  "re-export the bundle") from e
        return self._full

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if self.table is not None:
            return self.table.decode(ids, skip_special_tokens)
        return self.full.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        if self.table is not None:
            return self.table.id_to_token(i)
        return self.full.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        if self.table is not None:
            return self.table.token_to_id(token)
        return self.full.token_to_id(token)

    def encode(self, text: str, *args: Any, **kwargs: Any) -> Any:
        """`tokenizers.Tokenizer.encode` (builds the full tokenizer)."""
        return self.full.encode(text, *args, **kwargs)
