"""Resolve an export SOURCE: hub id, local transformers folder, CTranslate2 folder or builtin."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgestream.export.errors import ExportError

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class ResolvedSource:
    """What SOURCE names. `kind`: builtin, ct2, transformers (local folder) or hub."""

    text: str
    kind: str
    path: Path | None
    model_type: str


def _ct2_model_type(folder: Path) -> str:
    from edgestream.export.whisper.ct2 import is_ct2_whisper_folder

    return "whisper" if is_ct2_whisper_folder(folder) else ""


def resolve(source: str, revision: str | None = None) -> ResolvedSource:
    """Work out what kind of source `source` is without loading any weights yet."""
    if source.startswith(BUILTIN_PREFIX):
        from edgestream.export.lm.recipe import LM_BUILTINS, builtin_lm_folder
        from edgestream.export.whisper.ct2 import builtin_folder

        name = source[len(BUILTIN_PREFIX):]
        if name in LM_BUILTINS:  # a language model for the responder (a GGUF file)
            return ResolvedSource(source, "builtin", builtin_lm_folder(name), "llama")
        return ResolvedSource(source, "builtin", builtin_folder(name), "whisper")
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ExportError(f"{path}: SOURCE must be a model folder, a hub id or builtin:NAME")
        if (path / "model.bin").is_file():
            model_type = _ct2_model_type(path)
            if not model_type:
                raise ExportError(f"{path}/model.bin: a CTranslate2 model but not Whisper; only "
                                  "Whisper CTranslate2 folders can be imported")
            return ResolvedSource(source, "ct2", path, model_type)
        config = path / "config.json"
        if not config.is_file():
            raise ExportError(f"{path}: no config.json; expected a transformers model folder "
                              "(save_pretrained) or a CTranslate2 Whisper folder (model.bin)")
        try:
            model_type = json.loads(config.read_text()).get("model_type", "")
        except json.JSONDecodeError as e:
            raise ExportError(f"{config}: not valid JSON ({e})") from e
        return ResolvedSource(source, "transformers", path, model_type)
    if source.count("/") == 1 and not source.startswith((".", "/")):
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(source, revision=revision)
        except OSError as e:
            raise ExportError(f"{source}: cannot fetch this hub model's config ({e}); check the id "
                              "and your network, or pass a local folder") from e
        return ResolvedSource(source, "hub", None, config.model_type)
    raise ExportError(f"{source}: not a folder, not a hub id (owner/name) and not builtin:NAME")
