"""Instruction SFT with LoRA: SmolLM2-135M-Instruct on chatterbot-corpus conversations.

Before running, convert the model and export the conversations (README "Fine-tune"):
  jaxlm convert --from-gguf "$GGUF" --out models/smollm2
  jaxlm data export chatterbot --language english --out data/chatterbot_en.jsonl

Rows are rendered with the model's own chat template and packed; the loss covers assistant
tokens only. The tokenizer comes from the model directory (data.tokenizer = "embedded" means
"the base model's own" when model.init_from names a directory with a tokenizer). LoRA rank 16
on every attention and MLP projection; the frozen base is held in bfloat16. For a full
fine-tune: --config.finetune.lora_targets= --config.optim.learning_rate=5e-5
"""
from jaxlm.config import base_config


def get_config():
  config = base_config()
  config.model.init_from = "models/smollm2"
  config.data.sources = ("data/chatterbot_en.jsonl",)
  config.data.format = "chat"
  config.data.seq_len = 256
  config.data.batch_size = 8
  config.data.validation_fraction = 0.05
  config.finetune.lora_targets = "attention|mlp"
  config.finetune.lora_rank = 16
  config.finetune.lora_alpha = 32.0
  config.finetune.frozen_dtype = "bfloat16"
  config.optim.learning_rate = 5e-4
  config.optim.warmup_steps = 5
  config.optim.weight_decay = 0.0
  config.train.steps = 60  # about two passes over the 898 distinct conversations (207 rows)
  config.train.log_every = 5
  config.train.eval_every = 20
  config.train.eval_batches = 8
  config.checkpoint.every = 20
  return config
