"""The pipeline's tokenizer: a `tokenizers.Tokenizer` for fast batch encoding, and a
transformers tokenizer only where a chat template has to be rendered."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from jaxlm.data.sources import DataError
from jaxlm.data.text import end_of_text_id, load_tokenizer


class TextTokenizer:
  """tokenizer: a spec for `load_tokenizer` ("embedded", a tokenizer.json or a Hugging Face
  model directory), a `tokenizers.Tokenizer`, or a transformers tokenizer. chat_template: a
  Jinja template that replaces the tokenizer's own. add_special_tokens: wrap each example
  in what the tokenizer's post-processor puts around a text ([CLS] ... [SEP] for BERT,
  <s> ... </s> for RoBERTa): `wrap`, which the data build adds once per example, however
  many parts (words, prompt and completion) it is encoded in."""

  def __init__(self, tokenizer, chat_template: str = "", add_special_tokens: bool = False):
    self._hf = None
    self._directory = None
    if isinstance(tokenizer, str):
      self.backend = load_tokenizer(tokenizer)
      if Path(tokenizer).expanduser().is_dir():
        self._directory = str(Path(tokenizer).expanduser())
    elif isinstance(tokenizer, Tokenizer):
      self.backend = tokenizer
    elif hasattr(tokenizer, "backend_tokenizer"):
      self.backend, self._hf = tokenizer.backend_tokenizer, tokenizer
    else:
      raise TypeError(f"Expected a tokenizer spec, a tokenizers.Tokenizer or a transformers fast "
                      f"tokenizer, got {type(tokenizer).__name__}.")
    self.chat_template = chat_template
    self.add_special_tokens = add_special_tokens
    hf_eos = getattr(self._hf, "eos_token_id", None)
    self.eos_id = hf_eos if hf_eos is not None else _end_id(self.backend)
    self.vocab_size = self.backend.get_vocab_size()
    self.wrap = _special_tokens_around(self.backend) if add_special_tokens else (
        np.zeros(0, np.int32), np.zeros(0, np.int32))

  def fingerprint(self) -> str:
    digest = hashlib.sha256(self.backend.to_str().encode())
    digest.update(str(self.eos_id).encode())
    return digest.hexdigest()

  def encode(self, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text as is: no special tokens added (templates carry their own;
    `wrap` holds those of add_special_tokens)."""
    return [np.asarray(e.ids, np.int32) for e in self.backend.encode_batch_fast(
        texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self.backend.decode(list(map(int, ids)), skip_special_tokens=False)

  def template(self) -> str:
    """The chat template in use; part of the cache fingerprint for chat data."""
    return self.chat_template or (self._chat_tokenizer().chat_template or "")

  def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return self._chat_tokenizer().apply_chat_template(
        messages, chat_template=self.chat_template or None, tokenize=False,
        add_generation_prompt=add_generation_prompt)

  def _chat_tokenizer(self):
    if self._hf is None:
      from transformers import AutoTokenizer, PreTrainedTokenizerFast
      self._hf = (AutoTokenizer.from_pretrained(self._directory) if self._directory else
                  PreTrainedTokenizerFast(tokenizer_object=self.backend,
                                          eos_token=self.backend.id_to_token(self.eos_id)))
    if not (self.chat_template or self._hf.chat_template):
      raise DataError("data.format = 'chat' needs a chat template, and the tokenizer has none; "
                      "set data.chat_template to a Jinja template or use a tokenizer directory "
                      "whose tokenizer_config.json has one.")
    return self._hf


def _special_tokens_around(backend: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(ids before, ids after) the text that the post-processor adds to a single text."""
  marker = "x"
  plain = backend.encode(marker, add_special_tokens=False).ids
  wrapped = backend.encode(marker, add_special_tokens=True).ids
  start = next(i for i in range(len(wrapped) - len(plain) + 1)
               if wrapped[i:i + len(plain)] == plain)
  return (np.asarray(wrapped[:start], np.int32),
          np.asarray(wrapped[start + len(plain):], np.int32))


def _end_id(backend: Tokenizer) -> int:
  """The end-of-text id; a BERT WordPiece vocabulary has none, and its [SEP] ends a text."""
  try:
    return end_of_text_id(backend)
  except ValueError:
    if backend.token_to_id("[SEP]") is None:
      raise
    return backend.token_to_id("[SEP]")
