"""Text in, text out: load any model jaxlm reads, its tokenizer and end-of-text ids, and
generate (optionally through the tokenizer's chat template)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from flax import nnx

from jaxlm.generate.decode import generate, truncate_at_stop
from jaxlm.loading import LoadedParams, load_params, resolve_source
from jaxlm.models import Llama


def load_tokenizer_for(path: Path, loaded: LoadedParams):
  """A transformers tokenizer (for its chat template) for any model source."""
  from transformers import AutoTokenizer, PreTrainedTokenizerFast

  if path.suffix == ".gguf":
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  if loaded.tokenizer_file:  # a training run on a tokenizers file
    from jaxlm.data.text import END_OF_TEXT, load_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=load_tokenizer(loaded.tokenizer_file),
                                   eos_token=END_OF_TEXT)
  source = loaded.source or path
  if not any((source / name).is_file()
             for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
    raise FileNotFoundError(f"No tokenizer files in {source}; generation needs one.")
  return AutoTokenizer.from_pretrained(source)


def eos_ids(tokenizer, source: Path | None) -> tuple[int, ...]:
  ids = set() if tokenizer.eos_token_id is None else {tokenizer.eos_token_id}
  config = source / "generation_config.json" if source and source.is_dir() else None
  if config and config.is_file():
    eos = json.loads(config.read_text()).get("eos_token_id")
    ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
  return tuple(sorted(ids))


def generate_text(model_path: str | Path, prompts: Sequence[str], *, max_new_tokens: int = 64,
                  chat: bool = False, stop: Sequence[str] = (), temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, num_beams: int = 1,
                  length_penalty: float = 1.0, gnmt_length_penalty: bool = False,
                  seed: int = 0) -> list[str]:
  """The continuation of each prompt (with chat=True, each prompt is one user message and
  the answer is returned), cut before the first stop string."""
  path = resolve_source(model_path)
  loaded = load_params(path)
  if loaded.cfg.num_labels:
    raise ValueError(f"{model_path} is a classifier ({loaded.cfg.num_labels} classes): it "
                     f"predicts labels, not text. Score it with `jaxlm eval --model "
                     f"{model_path}`.")
  tokenizer = load_tokenizer_for(path, loaded)
  if chat:
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                         add_generation_prompt=True, tokenize=True)
           for p in prompts]
    ids = [i["input_ids"] if isinstance(i, dict) or hasattr(i, "keys") else i for i in ids]
  else:
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(loaded.cfg, rngs=nnx.Rngs(0))))
  outputs = generate((graphdef, loaded.params), ids, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams,
                     length_penalty=length_penalty, gnmt_length_penalty=gnmt_length_penalty,
                     eos_ids=eos_ids(tokenizer, loaded.source), seed=seed)
  return [truncate_at_stop(tokenizer.decode(out, skip_special_tokens=True), stop)
          for out in outputs]
