"""Cleaning before the split: HTML stripping, and a seeded split by content, so that every copy
of a text lands on the same side even when duplicates are kept."""
from __future__ import annotations

import hashlib
import html.parser
import re

BLOCK_TAGS = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "h1", "h2",
              "h3", "h4", "h5", "h6", "pre", "blockquote", "hr", "title"}
HIDDEN_TAGS = {"script", "style", "head", "noscript", "template"}


class _TextExtractor(html.parser.HTMLParser):

  def __init__(self):
    super().__init__(convert_charrefs=True)  # &amp; and &#20013; become their characters
    self.pieces: list[str] = []
    self.hidden = 0

  def handle_starttag(self, tag, attrs):
    if tag in HIDDEN_TAGS:
      self.hidden += 1
    if tag in BLOCK_TAGS:
      self.pieces.append("\n")

  def handle_endtag(self, tag):
    if tag in HIDDEN_TAGS and self.hidden:
      self.hidden -= 1
    if tag in BLOCK_TAGS:
      self.pieces.append("\n")

  def handle_data(self, data):
    if not self.hidden:
      self.pieces.append(data)


def strip_html(text: str) -> str:
  """The visible text of an HTML fragment: tags, scripts and styles removed, entities
  decoded, block elements on their own lines."""
  parser = _TextExtractor()
  parser.feed(text)
  parser.close()
  lines = (" ".join(line.split()) for line in "".join(parser.pieces).splitlines())
  return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def content_digest(parts) -> bytes:
  """16 bytes naming an example's content: what exact-duplicate removal compares."""
  digest = hashlib.blake2b(digest_size=16)
  for text, trained in parts:
    digest.update(b"\x01" if trained else b"\x00")
    digest.update(text.encode("utf-8", "surrogatepass"))
    digest.update(b"\xff")  # never in UTF-8: separates parts unambiguously
  return digest.digest()


def is_validation(digest: bytes, seed: int, fraction: float) -> bool:
  """A seeded hash of the content decides the split: stable when documents are added or
  removed, and identical copies always fall on the same side."""
  if fraction <= 0:
    return False
  keyed = hashlib.blake2b(digest, digest_size=8, key=seed.to_bytes(8, "little", signed=True))
  return int.from_bytes(keyed.digest(), "little") < fraction * 2.0**64
