"""mdmt.data."""
