"""Thin command-line tools over the `data` and `trainer` packages (no core logic lives only here)."""
