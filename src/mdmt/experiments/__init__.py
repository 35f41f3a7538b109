"""mdmt.experiments."""
