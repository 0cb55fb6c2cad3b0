"""edgestream runtime: bundle -> events, torch-free. The public surface is `load` -> `Model`,
`Model.stream()` -> `Stream`, `Model.transcribe()`; see `edgestream.runtime.api`."""

from edgestream.runtime.api import Model, Stream, StreamOptions, load

__all__ = ["Model", "Stream", "StreamOptions", "load"]
