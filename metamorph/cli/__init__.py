"""Hydra entry points: metamorph-train, metamorph-eval, metamorph-convert."""
