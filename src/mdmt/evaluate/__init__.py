"""mdmt.evaluate."""
