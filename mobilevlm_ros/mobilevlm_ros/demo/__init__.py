"""The demo: a synthetic world, the recipe that trains a tiny MobileVLM on it, and the shipped checkpoint."""

from pathlib import Path

DEMO_CHECKPOINT = Path(__file__).parent / "checkpoint"  # `mobilevlm train` writes it; the node's default model
