"""edgestream devices."""
