"""Knowledge distillation from a pretrained model into a small one: SmolLM2-135M-Instruct
teaches a 4-layer, 256-wide student (the demo architecture with SmolLM2's 49,152-token
vocabulary, 15.7M parameters) to write Jane Austen (the shipped corpus, tokenized with
SmolLM2's tokenizer).

Before running: jaxlm convert --from-gguf "$GGUF" --out models/smollm2 (README "Fine-tune").
The student alone, for comparison: --config.distill.teacher=

The loss is alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * cross-entropy on the
text; validation loss is the plain cross-entropy either way, so the two runs compare.
"""
from jaxlm.config import base_config


def get_config():
  config = base_config()
  config.model.preset = "demo"
  config.model.vocab_size = 49152  # SmolLM2's: distillation compares token distributions
  config.data.tokenizer = "models/smollm2"
  config.data.seq_len = 128
  config.data.batch_size = 8
  config.distill.teacher = "models/smollm2"
  config.distill.temperature = 2.0
  config.distill.alpha = 0.5
  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 20
  config.train.steps = 200
  config.train.log_every = 10
  config.train.eval_every = 50
  config.train.eval_batches = 8
  config.checkpoint.every = 50
  return config
