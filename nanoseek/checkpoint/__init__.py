"""Checkpoint formats: Hugging Face folders (safetensors, FP8 blocks), GGUF files, built-in names."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the file and, where known, the tensor."""
