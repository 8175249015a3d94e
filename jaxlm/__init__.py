"""jaxlm: train and fine-tune language models in JAX/Flax NNX, sharded over a device mesh."""
__version__ = "0.1.0"


def __getattr__(name):
  # Lazy: `import jaxlm` (and `jaxlm --help`) stays fast; JAX loads on first real use.
  if name in ("load_model", "load_params"):
    from jaxlm import loading
    return getattr(loading, name)
  raise AttributeError(f"module 'jaxlm' has no attribute {name!r}")
