"""The responder: a decoder LM bundle stepped beside the recognizer (see `responder.Responder`)."""

from edgestream.runtime.responder.lm import LanguageModel, load_lm

__all__ = ["LanguageModel", "load_lm"]
