"""Errors raised by the device runtime.

Every message names the file, field or device at fault and says what to do about it, because the
person reading it is usually looking at a kiosk's journal, not at the code.
"""

from __future__ import annotations


class EdgestreamError(Exception):
    """Base of every error the runtime raises on purpose (the CLI turns it into exit code 2)."""


class BundleError(EdgestreamError):
    """The bundle folder, its manifest or one of its graphs is missing, tampered or inconsistent."""


class AudioInputError(EdgestreamError):
    """An audio file or stream cannot be read as audio (not a WAV, truncated, unsupported)."""


class AudioDeviceError(EdgestreamError):
    """A capture device cannot be found or opened."""


class ProviderError(EdgestreamError):
    """An onnxruntime execution provider was asked for but is not available here."""


class OptionError(EdgestreamError):
    """A stream or load option that is unknown, out of range, or not for this bundle's family."""
