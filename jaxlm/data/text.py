"""The shipped corpus and tokenizer, and loading tokenizers."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_CORPUS = ASSETS / "austen.jsonl.gz"
EMBEDDED_TOKENIZER = ASSETS / "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"


def load_tokenizer(spec: str) -> Tokenizer:
  path = EMBEDDED_TOKENIZER if spec == "embedded" else Path(spec).expanduser()
  if path.is_dir():
    path = path / "tokenizer.json"
  if not path.is_file():
    raise FileNotFoundError(f"Tokenizer {spec!r} not found at {path}. Use 'embedded' or a "
                            f"path to a tokenizer.json (or a directory holding one).")
  return Tokenizer.from_file(str(path))


def end_of_text_id(tokenizer: Tokenizer) -> int:
  for token in (END_OF_TEXT, "</s>", "<|end_of_text|>", "<eos>"):
    token_id = tokenizer.token_to_id(token)
    if token_id is not None:
      return token_id
  raise ValueError(f"Tokenizer has no end-of-text token (looked for {END_OF_TEXT!r}, '</s>').")
