"""Evaluation: validation loss and perplexity (downstream tasks come on top of the same model interface)."""
