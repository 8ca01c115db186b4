"""Evaluation. Validation loss and perplexity run through the training engine (`Engine.evaluate`),
so they work under every parallel layout; downstream tasks build on the same model interface."""
