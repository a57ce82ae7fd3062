"""Training stages: pretraining, SFT, GRPO and distillation over shared step helpers (loop.py)."""
