"""Continued masked-LM pre-training of a BERT or RoBERTa encoder on the shipped Jane Austen
corpus, then `jaxlm eval --model WORKDIR` (masked-LM loss on the held-out split, fixed
masking seed) and `jaxlm convert --to-hf WORKDIR --out DIR` (loads as AutoModelForMaskedLM).

model.init_from is a Hugging Face BertForMaskedLM / RobertaForMaskedLM (or BertModel /
RobertaModel: a fresh MLM head is added) directory with its tokenizer, e.g. a download of
bert-base-uncased or roberta-base: --config.model.init_from=path/to/bert. Its architecture,
tokenizer and special tokens are used as they are. Without a checkpoint (offline), make a
stand-in first: a random 2-layer, 128-wide BERT (0.7M parameters) with a 2,048-token
WordPiece tokenizer trained on the same corpus (s(..., "roberta") for a RoBERTa). On two CPU
cores its 200 steps take about 80 s; eval_loss falls from 7.62 to 6.15:

  python -c "from jaxlm.convert.bert_hf import save_random_encoder as s; s('models/bert')"

Each step masks a new 15 % of the tokens (80 % [MASK], 10 % random, 10 % unchanged; never
[CLS], [SEP] or padding), drawn from the step's seed, so a resumed run masks exactly as an
uninterrupted one. Every document is wrapped as [CLS] ... [SEP] (<s> ... </s>) by the
tokenizer's post-processor (data.add_special_tokens), cut into 128-token windows and packed;
attention stays within each document. Dropout is the checkpoint's hidden_dropout_prob.
"""
from jaxlm.config import base_config


def get_config():
  config = base_config()
  config.model.init_from = "models/bert"
  config.data.add_special_tokens = True
  config.data.seq_len = 128
  config.data.batch_size = 16
  config.optim.learning_rate = 5e-4  # a stand-in from scratch; ~5e-5 for a real checkpoint
  config.optim.warmup_steps = 20
  config.optim.b2 = 0.999  # BERT's Adam
  config.optim.weight_decay = 0.01
  config.train.steps = 200
  config.train.log_every = 10
  config.train.eval_every = 100
  config.train.eval_batches = 8
  config.checkpoint.every = 100
  return config
