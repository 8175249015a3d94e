"""Optimizers, losses, the pure train step and the training loop."""
