"""Test helpers (fixture writers)."""
