"""Moonshine Streaming export: loading, graphs, recipe and parity."""
