"""Meter streams: one LLM response's usage, counted in memory against a growing grant."""
