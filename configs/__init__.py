"""The Hydra config tree, shipped inside the package: `pkg://forge_lm.configs` (no Python here)."""
