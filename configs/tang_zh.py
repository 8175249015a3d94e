"""Chinese pre-training demo: the default recipe (tiny_demo's demo-size Llama and schedule)
on Tang poems instead of Jane Austen, on a laptop CPU.

The 313 poems of Debian fortunes-zh `tang300` (title, poet and poem per row); export them
first with `jaxlm data export tang300 --out data/tang300.jsonl`. The shipped byte-level BPE
tokenizer was trained on English, so a Chinese character costs two to three tokens: it still
round-trips every character exactly (tested), which is what this demo shows.
"""
from jaxlm.config import load_config


def get_config():
  config = load_config("tiny_demo")
  config.unlock()
  config.data.sources = ("data/tang300.jsonl",)
  config.data.seq_len = 128
  config.data.validation_fraction = 0.05
  return config
