"""Errors shared across the pipeline; a leaf module so the tokenizer and checkpoints can both raise them."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the file and, where known, the tensor."""
