"""Chinese pre-training demo: the demo-sized Llama learns Tang poems on a laptop CPU.

The 313 poems of Debian fortunes-zh `tang300` (title, poet and poem per row); export them
first with `jaxlm data export tang300 --out data/tang300.jsonl`. The shipped byte-level BPE
tokenizer was trained on English, so a Chinese character costs two to three tokens: it still
round-trips every character exactly (tested), which is what this demo shows.
"""
from jaxlm.config import base_config


def get_config():
  config = base_config()
  config.model.preset = "demo"
  config.data.sources = ("data/tang300.jsonl",)
  config.data.seq_len = 128
  config.data.batch_size = 8
  config.data.validation_fraction = 0.05
  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 20
  config.train.steps = 300
  config.train.log_every = 10
  config.train.eval_every = 100
  config.checkpoint.every = 100
  return config
