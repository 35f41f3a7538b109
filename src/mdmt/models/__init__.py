"""mdmt.models."""
