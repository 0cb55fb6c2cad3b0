"""edgestream runtime."""
