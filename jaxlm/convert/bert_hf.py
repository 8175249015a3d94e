"""Hugging Face BERT / RoBERTa directories (config.json + safetensors) <-> jaxlm `Bert`.

Reads BertModel, BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification
and their Roberta* counterparts (and BertForPreTraining checkpoints, whose next-sentence head
is dropped); which of the pooler and the masked-LM head exist is read from the tensors
present, the classification head from `architectures`, `id2label` and `problem_type`. Writes
*For{Sequence,Token}Classification for a classifier, *ForMaskedLM for a model with an MLM
head, *Model otherwise.
"""
from __future__ import annotations

import json
from pathlib import Path

from jaxlm.convert.bert_weights import FAMILIES, params_from_reader, write_tensors
from jaxlm.convert.errors import ConversionError
from jaxlm.convert.hf_config import CLASSIFIER_SUFFIXES, classifier_kind, num_labels
from jaxlm.convert.safetensors_io import SafetensorsReader, ShardedSafetensorsWriter
from jaxlm.models.bert import ACTIVATIONS, BertConfig

CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta"}
_HEAD_DENSE = {"bert": "cls.predictions.transform.dense.weight",
               "roberta": "lm_head.dense.weight"}


class _CanonicalNames:
  """A reader under today's names: the original BERT checkpoints call LayerNorm parameters
  gamma / beta, which transformers renames on load."""

  def __init__(self, reader):
    self._reader = reader
    self._stored = {self._canonical(n): n for n in reader.names()}

  @staticmethod
  def _canonical(name: str) -> str:
    for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
      if "LayerNorm" in name and name.endswith(old):
        return name.removesuffix(old) + new
    return name

  def names(self) -> list[str]:
    return list(self._stored)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._reader.shape(self._stored[name])

  def get(self, name: str):
    return self._reader.get(self._stored[name])


def _family(hf: dict) -> str:
  family = hf.get("model_type")
  if family not in FAMILIES:
    classes = ", ".join(hf.get("architectures") or [])
    raise ConversionError(f"Unsupported encoder model_type={family!r}"
                          + (f" ({classes})" if classes else "")
                          + f". Supported: {', '.join(FAMILIES)}.")
  return family


def config_from_hf(hf: dict, tensor_names: list[str]) -> tuple[BertConfig, str, str]:
  """-> (config, family, encoder tensor prefix: "" or "bert." / "roberta.")."""
  family = _family(hf)
  problems = []
  act = hf.get("hidden_act", "gelu")
  if act not in ACTIVATIONS:
    problems.append(f"hidden_act={act!r} (supported: {', '.join(ACTIVATIONS)})")
  if hf.get("is_decoder") or hf.get("add_cross_attention"):
    problems.append("is_decoder / add_cross_attention (decoder use of the encoder)")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    problems.append(f"position_embedding_type={hf['position_embedding_type']!r} "
                    f"(only 'absolute')")
  if not hf.get("tie_word_embeddings", True):
    problems.append("tie_word_embeddings=false (an MLM decoder separate from the embeddings)")
  if problems:
    raise ConversionError("Unsupported config.json settings: " + "; ".join(problems))
  prefix = f"{family}." if any(n.startswith(f"{family}.") for n in tensor_names) else ""
  classes = num_labels(hf)
  kind = classifier_kind(hf) or "sequence"
  if classes and hf.get("problem_type") == "regression":
    kind = "regression"
  pooler = (f"{prefix}pooler.dense.weight" in tensor_names
            or (family == "roberta" and "classifier.dense.weight" in tensor_names))
  pad = hf.get("pad_token_id")
  pad = (1 if family == "roberta" else 0) if pad is None else pad
  cfg = BertConfig(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
      mlp_dim=hf["intermediate_size"], max_position_embeddings=hf["max_position_embeddings"],
      type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
      hidden_act=act, mlm_head_act="gelu" if family == "roberta" else act,
      position_offset=pad + 1 if family == "roberta" else 0, pad_token_id=pad,
      dropout_rate=hf.get("hidden_dropout_prob", 0.0),
      pooler=pooler, mlm_head=_HEAD_DENSE[family] in tensor_names, num_labels=classes,
      classifier=kind,
      init_std=hf.get("initializer_range", 0.02), compute_dtype="float32")
  return cfg, family, prefix


def _open(path: str | Path) -> tuple[dict, _CanonicalNames]:
  path = Path(path)
  return (json.loads((path / "config.json").read_text()),
          _CanonicalNames(SafetensorsReader(path)))


def read_bert_config(path: str | Path) -> tuple[BertConfig, str, dict]:
  """-> (config, family, the raw config.json) of an HF directory, reading no weights."""
  hf, reader = _open(path)
  cfg, family, _ = config_from_hf(hf, reader.names())
  return cfg, family, hf


def load_bert(path: str | Path, shardings: dict | None = None) -> tuple[BertConfig, dict]:
  """An HF directory -> (config, params as a pure dict for `bert_from_params`); shardings,
  a matching dict of jax.sharding.Sharding, places each tensor as it is read."""
  hf, reader = _open(path)
  cfg, family, prefix = config_from_hf(hf, reader.names())
  return cfg, params_from_reader(reader, cfg, family, prefix, shardings)


def _check_representable(cfg: BertConfig, family: str) -> None:
  roberta = family == "roberta"
  problems = []
  if cfg.position_offset != (cfg.pad_token_id + 1 if roberta else 0):
    problems.append(f"position_offset={cfg.position_offset} with pad_token_id="
                    f"{cfg.pad_token_id} ({family} needs "
                    f"{'pad_token_id + 1' if roberta else '0'})")
  if cfg.mlm_head and cfg.mlm_head_act != ("gelu" if roberta else cfg.hidden_act):
    problems.append(f"mlm_head_act={cfg.mlm_head_act!r} ({family}'s head uses "
                    f"{'gelu' if roberta else 'hidden_act'})")
  if cfg.num_labels and cfg.mlm_head:
    problems.append("both a classification and a masked-LM head (transformers has one head)")
  if cfg.num_labels and cfg.classifier == "token" and cfg.pooler:
    problems.append("a pooler on a token classifier (*ForTokenClassification has none)")
  if problems:
    raise ConversionError(f"The model cannot be written as {family}: " + "; ".join(problems))


def architecture(cfg: BertConfig, family: str) -> str:
  if cfg.num_labels:
    suffix = CLASSIFIER_SUFFIXES["token" if cfg.classifier == "token" else "sequence"]
  else:
    suffix = "ForMaskedLM" if cfg.mlm_head else "Model"
  return CLASS_PREFIX[family] + suffix


def label_fields(cfg: BertConfig, labels: tuple[str, ...] | None) -> dict:
  """num_labels, id2label / label2id (labels, else LABEL_i) and problem_type of a head."""
  names = list(labels or (f"LABEL_{i}" for i in range(cfg.num_labels)))
  if len(names) != cfg.num_labels:
    raise ConversionError(f"{len(names)} label names ({', '.join(names)}) for a classifier "
                          f"of num_labels={cfg.num_labels}.")
  problem = {"regression": "regression", "sequence": "single_label_classification"}
  fields = {"num_labels": cfg.num_labels, "id2label": dict(enumerate(names)),
            "label2id": {name: i for i, name in enumerate(names)}}
  if cfg.classifier in problem:
    fields["problem_type"] = problem[cfg.classifier]
  return fields


def hf_config_for(cfg: BertConfig, family: str, *, dtype: str, base: dict | None = None,
                  labels: tuple[str, ...] | None = None) -> dict:
  """A config.json for `cfg`; keys of `base` (the source model's config) are kept so token
  ids and other settings survive a round trip. labels: a classifier's class names."""
  name = architecture(cfg, family)
  hf = dict(base or {})
  for key in ("torch_dtype", "num_labels", "id2label", "label2id", "problem_type"):
    hf.pop(key, None)
  if cfg.num_labels:
    hf.update(label_fields(cfg, labels))
  hf.setdefault("attention_probs_dropout_prob", cfg.dropout_rate)
  hf.update({
      "architectures": [name], "model_type": family, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.mlp_dim,
      "hidden_act": cfg.hidden_act, "max_position_embeddings": cfg.max_position_embeddings,
      "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": cfg.layer_norm_eps,
      "pad_token_id": cfg.pad_token_id, "hidden_dropout_prob": cfg.dropout_rate,
      "initializer_range": cfg.init_std, "tie_word_embeddings": True,
      "position_embedding_type": "absolute", "is_decoder": False, "dtype": dtype,
  })
  return hf


def save_bert(cfg: BertConfig, params: dict, out_dir: str | Path, family: str,
              dtype: str = "float32", *, base: dict | None = None,
              labels: tuple[str, ...] | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
  """Writes config.json and safetensors that transformers' from_pretrained loads as
  {Bert,Roberta}For{Sequence,Token}Classification (a classifier, `labels` its class names),
  {Bert,Roberta}ForMaskedLM (with an MLM head; a pooler is kept as {family}.pooler.*, which
  *Model classes load) or {Bert,Roberta}Model."""
  if family not in FAMILIES:
    raise ConversionError(f"Unknown family {family!r}; choose one of {', '.join(FAMILIES)}.")
  _check_representable(cfg, family)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  prefix = f"{family}." if cfg.mlm_head or cfg.num_labels else ""
  write_tensors(ShardedSafetensorsWriter(out, max_shard_bytes), cfg, params, family, prefix,
                dtype)
  config = hf_config_for(cfg, family, dtype=dtype, base=base, labels=labels)
  (out / "config.json").write_text(json.dumps(config, indent=2))
  return out


_SPECIAL_TOKENS = {"bert": ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
                   "roberta": ("<s>", "<pad>", "</s>", "<unk>", "<mask>")}


def _train_tokenizer(family: str, texts, vocab_size: int):
  """A WordPiece (BERT) or byte-level BPE (RoBERTa) tokenizer trained on texts, with the
  family's special tokens and post-processor."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  from tokenizers import trainers
  specials = list(_SPECIAL_TOKENS[family])
  if family == "bert":
    # WordPieceTrainer learns another vocabulary in every process (tokenizers#1794: its "##"
    # pieces are numbered in hash-map order, which breaks ties between merges), and so would
    # every stand-in model and every figure trained on one. BPE training is deterministic:
    # its pieces, each also as a "##" continuation where BPE splits a word there, the pieces
    # learnt last left out to keep to vocab_size.
    texts = list(texts)
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.normalizer = normalizers.BertNormalizer(lowercase=True)
    bpe.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size,
                                                       special_tokens=specials))
    pieces = [p for p, _ in sorted(bpe.get_vocab().items(), key=lambda item: item[1])
              if p not in specials]
    continued = set()
    for encoding in bpe.encode_batch(texts):
      words = encoding.word_ids
      continued.update(t for i, t in enumerate(encoding.tokens) if i and words[i] == words[i - 1])
    size = len(specials)
    for count, piece in enumerate(pieces):
      size += 1 + (piece in continued)
      if size > vocab_size:
        pieces = pieces[:count]
        break
    vocab = {t: i for i, t in enumerate(
        specials + pieces + ["##" + p for p in pieces if p in continued])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = bpe.normalizer, bpe.pre_tokenizer
    tok.add_special_tokens(specials)  # "[SEP]" in a text is the separator, as trained ones read it
    tok.decoder = decoders.WordPiece()
  else:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  ids = {t: tok.token_to_id(t) for t in specials}
  if family == "bert":
    tok.post_processor = processors.BertProcessing(("[SEP]", ids["[SEP]"]),
                                                   ("[CLS]", ids["[CLS]"]))
  else:
    tok.post_processor = processors.RobertaProcessing(("</s>", ids["</s>"]), ("<s>", ids["<s>"]))
  return tok


def _embedded_texts():
  import gzip
  from jaxlm.data.text import EMBEDDED_CORPUS
  with gzip.open(EMBEDDED_CORPUS, "rt") as f:
    return [json.loads(line)["text"] for line in f]


def save_random_encoder(out_dir: str | Path, family: str = "bert", *, texts=None,
                        vocab_size: int = 2048, hidden_size: int = 128, num_layers: int = 2,
                        num_heads: int = 2, mlp_dim: int = 512, max_positions: int = 512,
                        seed: int = 0) -> Path:
  """A randomly initialised {Bert,Roberta}ForMaskedLM and a tokenizer trained on `texts`
  (default: the embedded Austen corpus), written with transformers' save_pretrained: a
  stand-in for a downloaded checkpoint where there is none (offline, tests). The same texts
  give the same files in every process.

    python -c "from jaxlm.convert.bert_hf import save_random_encoder as s; s('models/bert')"
  """
  import torch
  import transformers
  if family not in CLASS_PREFIX:
    raise ValueError(f"family must be one of {', '.join(CLASS_PREFIX)}, not {family!r}.")
  tok = _train_tokenizer(family, _embedded_texts() if texts is None else texts, vocab_size)
  names = dict(zip(("pad", "unk", "cls", "sep", "mask") if family == "bert" else
                   ("bos", "pad", "eos", "unk", "mask"), _SPECIAL_TOKENS[family]))
  if family == "roberta":
    names.update(cls=names["bos"], sep=names["eos"])
  # BERT's tokenizer returns token types (a pair's second text is type 1), RoBERTa's none.
  inputs = ["input_ids", "token_type_ids", "attention_mask"] if family == "bert" else [
      "input_ids", "attention_mask"]
  hf_tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, model_input_names=inputs,
      **{f"{k}_token": v for k, v in names.items()})
  roberta = family == "roberta"
  pad_id = tok.token_to_id(names["pad"])
  config = getattr(transformers, CLASS_PREFIX[family] + "Config")(
      vocab_size=tok.get_vocab_size(), hidden_size=hidden_size, num_hidden_layers=num_layers,
      num_attention_heads=num_heads, intermediate_size=mlp_dim,
      # RoBERTa's first pad_token_id + 1 positions are never used by tokens.
      max_position_embeddings=max_positions + (pad_id + 1 if roberta else 0),
      pad_token_id=pad_id, **({"bos_token_id": tok.token_to_id("<s>"),
                               "eos_token_id": tok.token_to_id("</s>")} if roberta else {}))
  torch.manual_seed(seed)
  model = getattr(transformers, CLASS_PREFIX[family] + "ForMaskedLM")(config)
  out = Path(out_dir)
  model.save_pretrained(out)
  hf_tokenizer.save_pretrained(out)
  return out
