"""Inference: grounding-then-answering generation (SPEC §5)."""
