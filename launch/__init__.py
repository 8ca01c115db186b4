"""Launch helpers. A single-device run needs none: `python -m trainer.train <overrides>`."""
