"""Shared pieces: configuration, trajectory data and rendering, the embedded tiny models."""
