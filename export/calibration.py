"""Calibration data for static quantization (`int8-qdq`): the real inputs of every graph while the
fp32 bundle transcribes speech.

Static int8 fixes each activation's scale at export time, so the scales must come from what the
graphs really see. The fp32 bundle is loaded with the runtime and transcribes the calibration clips
(default: the project's real clips, the evaluation folder's `refs.tsv`); every session call's feeds
are recorded, whatever the family (Whisper: encoder windows, decoder steps and K-token blocks;
moonshine_streaming: encoder chunks, memory, decoder). Long recordings are thinned evenly to at most
`max_per_graph` feeds per graph. Inputs a graph sees unchanged from call to call (the cross
attention K/V of one window) are stored once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from edgestream.export.errors import ExportError

log = logging.getLogger(__name__)

MAX_PER_GRAPH = 32


@dataclass(frozen=True)
class Calibration:
    """Recorded feeds per graph name, and the clips they came from."""

    feeds: dict[str, tuple[dict[str, np.ndarray], ...]]
    clips: tuple[str, ...]


class _Recorder:
    """Wraps one GraphSession's `run`, copying its feeds (shared copies for unchanged inputs)."""

    def __init__(self, session: object) -> None:
        self.session, self.calls = session, []
        self._last: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._run = session.run  # type: ignore[attr-defined]
        session.run = self  # type: ignore[attr-defined]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kept = {}
        for name, value in feeds.items():
            last = self._last.get(name)
            if last is not None and last[0] is value and np.array_equal(value, last[1]):
                kept[name] = last[1]
            else:
                kept[name] = np.array(value, copy=True)
                self._last[name] = (value, kept[name])
        self.calls.append(kept)
        return self._run(feeds)


def calibration_clips(folder: Path) -> list[Path]:
    """The clips listed in `folder/refs.tsv`."""
    refs = Path(folder) / "refs.tsv"
    if not refs.is_file():
        raise ExportError(f"{refs}: int8-qdq calibrates on the clips listed there (file, tab, "
                          "reference text); pass --eval-audio DIR with one")
    names = [line.split("\t", 1)[0].strip() for line in refs.read_text().splitlines()
             if line.strip()]
    return [Path(folder) / n for n in names]


def record(bundle: Path, clips: list[Path], max_per_graph: int = MAX_PER_GRAPH,
           threads: int = 2) -> Calibration:
    """Transcribe `clips` with the fp32 bundle at `bundle` and keep every graph's feeds."""
    from edgestream.runtime import load
    from edgestream.runtime.audio.wav import read_wav
    from edgestream.runtime.errors import AudioInputError

    model = load(bundle, provider="cpu", threads=threads)
    m = model.bundle.manifest
    recorders = {g.name: _Recorder(model.bundle.sessions[g.name]) for g in m.graphs
                 if g.name != m.vad}
    for clip in clips:
        try:
            wav = read_wav(clip)
        except (AudioInputError, OSError) as e:
            raise ExportError(f"{clip}: calibration audio is unreadable ({e}); fix or remove it "
                              "from refs.tsv") from e
        model.transcribe(wav.samples, wav.sample_rate)
    feeds = {}
    for name, r in recorders.items():
        if not r.calls:
            raise ExportError(f"{bundle}: graph {name} was never run while transcribing the "
                              "calibration clips; give clips with speech")
        keep = np.linspace(0, len(r.calls) - 1, min(max_per_graph, len(r.calls)))
        feeds[name] = tuple(r.calls[int(i)] for i in np.unique(keep.round().astype(int)))
        log.info("calibration %s: %d of %d calls kept", name, len(feeds[name]), len(r.calls))
    return Calibration(feeds, tuple(str(c) for c in clips))


def feed_reader(feeds: tuple[dict[str, np.ndarray], ...]) -> object:
    """onnxruntime's CalibrationDataReader over one graph's recorded feeds."""
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    return FeedReader()
