"""Typed events, their JSON schema, the sinks that carry them and bounded stream statistics."""
