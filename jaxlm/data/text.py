"""Documents from the embedded corpus or local files, and tokenizers."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from tokenizers import Tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_CORPUS = ASSETS / "austen.jsonl.gz"
EMBEDDED_TOKENIZER = ASSETS / "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"


def _open_text(path: Path):
  return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(
      path, encoding="utf-8")


def corpus_path(spec: str) -> Path:
  path = EMBEDDED_CORPUS if spec == "embedded" else Path(spec).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"Corpus {spec!r} not found at {path}. Use 'embedded' or a path "
                            f"to a .txt, .jsonl or .jsonl.gz file.")
  return path


def read_documents(spec: str) -> list[str]:
  """A .jsonl(.gz) file gives one document per row (its "text" field); any other file is
  one document."""
  path = corpus_path(spec)
  if ".jsonl" not in path.suffixes:
    with _open_text(path) as f:
      return [f.read()]
  documents = []
  with _open_text(path) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        documents.append(row["text"])
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{line_no}: expected a JSON object with a \"text\" field "
                         f"({type(e).__name__}: {e}).") from None
  return documents


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
