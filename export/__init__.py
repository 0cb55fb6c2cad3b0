"""edgestream export."""
