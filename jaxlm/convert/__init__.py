"""Hugging Face (safetensors + config.json) and GGUF <-> jaxlm."""
