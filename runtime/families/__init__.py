"""Model families the runtime can drive, looked up by the manifest's pipeline kind.

A family is one engine (its graphs, per stream) plus one policy (how the stream gate turns a
line's audio into hypotheses), and registers itself here; a new family is one `Family` entry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edgestream.runtime.errors import BundleError

# the families shipped with the runtime (imported on first lookup)
BUILTIN = ("edgestream.runtime.families.whisper.family",
           "edgestream.runtime.families.moonshine.family")


@dataclass(frozen=True)
class Family:
    """`options`: the frozen dataclass of the family's stream options; `cadence_option`: which
    of them is the partial cadence in ms; `make_policy(bundle, options)` -> (policy, the
    stream's state store); `transcribe(model, samples, options)` -> Transcript of 16 kHz mono
    audio with the family's options."""

    name: str
    pipeline: str
    options: type
    cadence_option: str
    make_policy: Callable[[Any, Any], tuple[Any, Any]]
    transcribe: Callable[[Any, np.ndarray, Any], Any]


REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    REGISTRY[family.pipeline] = family
    return family


def lookup(pipeline: str, where: str) -> Family:
    for module in BUILTIN:  # cached after the first time
        importlib.import_module(module)
    if pipeline not in REGISTRY:
        raise BundleError(f"{where}: pipeline {pipeline!r} has no driver in this runtime (it "
                          f"drives {', '.join(sorted(REGISTRY))}); upgrade edgestream")
    return REGISTRY[pipeline]


def all_families() -> list[Family]:
    for module in BUILTIN:
        importlib.import_module(module)
    return list(REGISTRY.values())
