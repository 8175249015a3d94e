"""Orbax checkpoints of the train state, the data-loader position and the run's model shape."""
from jaxlm.checkpoint.manager import CheckpointMismatchError, Checkpointer

__all__ = ["Checkpointer", "CheckpointMismatchError"]
