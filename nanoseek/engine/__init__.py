"""Inference: sampling and generation loops on token ids (the engine knows no text)."""
