"""Whisper export: loading (HF or CTranslate2), graphs, recipe and parity."""
