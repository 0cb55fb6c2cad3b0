"""Decoder-only language models (the responder): recipe, step/chunk graph, chat pieces, parity."""
