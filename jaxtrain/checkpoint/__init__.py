"""Orbax checkpoints with autoresume."""
