"""Rows -> examples: the texts an example is made of, each part marked whether its tokens are
trained on (loss_mask 1) or only conditioned on.

  text            {text}                     all trained
  sft             {prompt, completion}       completion trained
  chat            {messages: [{role, content}, ...]}
                                             assistant turns trained, rendered with the
                                             tokenizer's chat template or data.chat_template
  classification  {text, label}              prompt_template conditioned, " " + label trained
  pairs           {text_a, text_b, label}    likewise
  tagging         {tokens: [word, ...], tags: [tag, ...]}
                                             a tag per word, for a token classifier (NER);
                                             words joined by data.word_separator

A label is a string from data.labels or an int indexing it. For a classification head
(label_head=True) the label is not text: the example is the rendered prompt alone and carries
the label's index, which shaping makes the target of the prompt's last token. For a
regression head (regression=True) the label is a number, the example's score, and data.labels
is empty. A row that does not fit raises RowError, which the build counts against
data.error_budget.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import string

from jaxlm.data.clean import strip_html
from jaxlm.data.sources import DataError

FIELDS = {"text": ("text",), "sft": ("prompt", "completion"), "chat": ("messages",),
          "classification": ("text",), "pairs": ("text_a", "text_b"),
          "tagging": ("tokens", "tags")}
DEFAULT_PROMPTS = {"classification": "{text}\nLabel:", "pairs": "{text_a}\n{text_b}\nLabel:"}
HEAD_FORMATS = ("classification", "pairs", "tagging")  # formats a classifier (num_labels) reads
# The largest float32: a larger score would reach training as inf (rows hold float32 scores).
FLOAT32_MAX = 3.4028234663852886e38


class RowError(ValueError):
  """A row that does not fit the format."""


@dataclasses.dataclass(frozen=True)
class Example:
  parts: tuple[tuple[str, bool], ...]  # (text, trained)
  chars: int  # characters of the row's own text, compared with data.min_chars
  eos: bool  # ends with the end-of-text token; chat templates close their turns themselves
  # the class index, for a classification head; the score, for a regression head
  label: int | float | None = None
  tags: tuple[int, ...] | None = None  # for tagging: each part is a word, this its tag index


class Formatter:

  def __init__(self, fmt: str, *, labels=(), prompt_template: str = "",
               strip_html: bool = False, tokenizer=None, label_head: bool = False,
               regression: bool = False, word_separator: str = " "):
    if fmt not in FIELDS:
      raise DataError(f"data.format must be one of {', '.join(FIELDS)}, not {fmt!r}.")
    self.fmt = fmt
    self.labels = tuple(labels)
    self.strip_html = strip_html
    self.tokenizer = tokenizer
    self.label_head = label_head or regression
    self.regression = regression
    self.word_separator = word_separator
    self.prompt_template = prompt_template or DEFAULT_PROMPTS.get(fmt, "")
    if regression:
      self._check_regression()
    if self.label_head and fmt not in HEAD_FORMATS:
      raise DataError(f"A classification head (model.num_labels > 0) needs data.format "
                      f"'classification' or 'pairs' (a label per example) or 'tagging' (a tag "
                      f"per word), not {fmt!r}.")
    if fmt == "tagging" and not label_head:
      raise DataError("data.format = 'tagging' trains a token classifier: set model.num_labels "
                      "to the number of data.labels (the tag set).")
    if fmt in HEAD_FORMATS and not self.labels and not regression:
      raise DataError(f"data.format = {fmt!r} needs data.labels, the allowed label names.")
    if fmt in DEFAULT_PROMPTS:
      used = {name for _, name, _, _ in string.Formatter().parse(self.prompt_template) if name}
      if not used <= set(FIELDS[fmt]):
        raise DataError(f"data.prompt_template {self.prompt_template!r} uses "
                        f"{sorted(used - set(FIELDS[fmt]))}; {fmt} rows have "
                        f"{', '.join(FIELDS[fmt])}.")

  def __call__(self, row: dict) -> Example:
    if self.fmt == "chat":
      return self._chat(row)
    if self.fmt == "tagging":
      return self._tagging(row)
    fields = {name: self._text(row, name) for name in FIELDS[self.fmt]}
    chars = sum(map(len, fields.values()))
    if self.fmt == "text":
      return Example(((fields["text"], True),), chars, eos=True)
    if self.fmt == "sft":
      return Example(((fields["prompt"], False), (fields["completion"], True)), chars, eos=True)
    prompt = self.prompt_template.format(**fields)
    if self.regression:
      return Example(((prompt, True),), chars, eos=True, label=self._score(row))
    label = self._label(row)
    if self.label_head:
      # Marked trained so that shaping keeps it; the only target is the label (shaping.py).
      return Example(((prompt, True),), chars, eos=True, label=self.labels.index(label))
    return Example(((prompt, False), (" " + label, True)), chars, eos=True)

  def _check_regression(self) -> None:
    if self.fmt not in DEFAULT_PROMPTS:
      raise DataError(f"A regression head (model.classifier = 'regression') reads a number "
                      f"per example: set data.format to 'classification' ({{text, label}}) or "
                      f"'pairs' ({{text_a, text_b, label}}), not {self.fmt!r}.")
    if self.labels:
      raise DataError(f"data.labels names classes ({list(self.labels)}), but a regression head "
                      f"(model.classifier = 'regression') predicts each row's number label: "
                      f"unset data.labels, or train a classifier (model.classifier = "
                      f"'sequence', model.num_labels = {len(self.labels)}).")

  def _score(self, row: dict) -> float:
    """A regression label: any real number that float32 holds (Python's, numpy's)."""
    value = row.get("label")
    if value is None:
      raise RowError("missing field 'label'")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      raise RowError(f"field 'label' must be a number for a regression head, got "
                     f"{type(value).__name__} {value!r}")
    if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
      raise RowError(f"field 'label' must be a finite number (float32), got {value!r}")
    return float(value)

  def _clean(self, text: str) -> str:
    return strip_html(text) if self.strip_html else text

  def _text(self, row: dict, name: str) -> str:
    if name not in row or row[name] is None:
      raise RowError(f"missing field {name!r} (has {', '.join(map(repr, row)) or 'none'})")
    if not isinstance(row[name], str):
      raise RowError(f"field {name!r} must be a string, got {type(row[name]).__name__}")
    return self._clean(row[name])

  def _label(self, row: dict) -> str:
    if row.get("label") is None:
      raise RowError("missing field 'label'")
    return self._label_name(row["label"], "label")

  def _label_name(self, label, what: str) -> str:
    if isinstance(label, str):
      if label not in self.labels:
        raise RowError(f"{what} {label!r} is not one of data.labels {list(self.labels)}")
      return label
    if isinstance(label, int) and not isinstance(label, bool):
      if not 0 <= label < len(self.labels):
        raise RowError(f"{what} index {label} is outside data.labels "
                       f"(0..{len(self.labels) - 1})")
      return self.labels[label]
    raise RowError(f"{what} must be a string or an int index, got {type(label).__name__}")

  def _tagging(self, row: dict) -> Example:
    words, tags = row.get("tokens"), row.get("tags")
    for name, value in (("tokens", words), ("tags", tags)):
      if not isinstance(value, list) or not value:
        raise RowError(f"field {name!r} must be a non-empty list (has "
                       f"{', '.join(map(repr, row)) or 'none'})")
    if len(words) != len(tags):
      raise RowError(f"{len(words)} tokens but {len(tags)} tags: need one tag per token")
    bad = [i for i, word in enumerate(words) if not isinstance(word, str) or not word.strip()]
    if bad:
      raise RowError(f"tokens[{bad[0]}] must be a non-empty string, got {words[bad[0]]!r}")
    names = [self._label_name(tag, f"tags[{i}]") for i, tag in enumerate(tags)]
    # The separator (a space) goes before every word but the first: a byte-level BPE then
    # gives each word the tokens it has in running text (see jaxlm/evaluate/ner.py).
    parts = tuple((self._clean(word) if i == 0 else self.word_separator + self._clean(word),
                   True) for i, word in enumerate(words))
    return Example(parts, sum(map(len, words)), eos=True,
                   tags=tuple(self.labels.index(name) for name in names))

  def _chat(self, row: dict) -> Example:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
      raise RowError("field 'messages' must be a non-empty list of {role, content} objects")
    clean = []
    for i, message in enumerate(messages):
      if not (isinstance(message, dict) and isinstance(message.get("role"), str)
              and isinstance(message.get("content"), str)):
        raise RowError(f"messages[{i}] must be an object with string 'role' and 'content'")
      clean.append({"role": message["role"], "content": self._clean(message["content"])})
    roles = [m["role"] for m in clean]
    if "assistant" not in roles:
      raise RowError("no assistant message: nothing to train on")
    if roles[0] == "assistant":
      raise RowError("the conversation starts with an assistant message: nothing to condition on")
    chars = sum(len(m["content"]) for m in clean)
    return Example(tuple(self._chat_parts(clean)), chars, eos=False)

  def _chat_parts(self, messages: list[dict]):
    """Renders growing prefixes of the conversation: each turn's text is what it adds to the
    rendering, and an assistant turn's header (the generation prompt) is conditioned on, so
    the tokens trained on are those a model generates after the prompt it will be given."""
    rendered = ""
    for i, message in enumerate(messages):
      steps = [(messages[:i], True, False)] if message["role"] == "assistant" else []
      steps.append((messages[:i + 1], False, message["role"] == "assistant"))
      for prefix, generation_prompt, trained in steps:
        try:
          text = self.tokenizer.render_chat(prefix, add_generation_prompt=generation_prompt)
        except Exception as e:  # the template rejects this conversation (jinja raise_exception)
          raise RowError(f"the chat template rejects it ({type(e).__name__}: {e})") from None
        if not text.startswith(rendered):
          raise DataError("The chat template renders earlier turns differently once later ones "
                          "are added, so the assistant tokens cannot be located; set "
                          "data.chat_template to a template that renders each turn on its own.")
        yield text[len(rendered):], trained
        rendered = text
