"""jaxlm: train and fine-tune language models in JAX/Flax NNX, sharded over a device mesh."""
__version__ = "0.1.0"
