"""Model, training loop, checkpoints, evaluation, inference and Hugging Face interop.

Entry point: `forge train [Hydra overrides]`.
"""
