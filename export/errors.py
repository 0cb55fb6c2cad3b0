"""Errors raised on the workstation side (export, conversion, parity)."""

from __future__ import annotations

from edgestream.runtime.errors import EdgestreamError


class ExportError(EdgestreamError):
    """A model source cannot be resolved, converted or exported."""


class ParityError(ExportError):
    """The exported graphs disagree with the original model; carries the full report."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report
