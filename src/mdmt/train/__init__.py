"""mdmt.train."""
