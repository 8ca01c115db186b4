"""Model, training loop, checkpoints, evaluation, inference and Hugging Face interop.

Entry point: `python -m trainer.train [Hydra overrides]`.
"""
