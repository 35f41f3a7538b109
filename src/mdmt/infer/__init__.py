"""mdmt.infer."""
