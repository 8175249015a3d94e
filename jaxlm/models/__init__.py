from jaxlm.models.config import PRESETS, LlamaConfig, from_preset
from jaxlm.models.llama import Llama

__all__ = ["PRESETS", "LlamaConfig", "Llama", "from_preset"]
