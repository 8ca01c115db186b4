"""Text generation from a trained decoder."""
