"""Benchmarks and the real-data tooling they share (captures of SmolLM2 attention states)."""
