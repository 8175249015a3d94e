"""Every command the README and `jaxlm --help` show parses as written: each `jaxlm`
command's arguments (the CLI's own parser), its preset, recipe and --config overrides (keys
that exist, values of their type), and each `python bench/*.py` command's arguments.
Running them is for each feature's own tests; this catches examples that drifted from the
code (a renamed flag or key, a removed recipe or preset)."""
from __future__ import annotations

import argparse
import importlib.util
import shlex
from pathlib import Path

import pytest

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm.models.config import PRESETS
from jaxlm.models.factory import ENCODER_PRESETS

ROOT = Path(__file__).resolve().parents[1]
# The launchers run the command after their own arguments: `local.sh 2 jaxlm train ...`.
LAUNCHED = ("launch/cpu_devices.sh", "launch/local.sh", "launch/tpu_pod.sh")
# Subcommands whose overrides go onto a recipe (the named one, or the default).
TAKES_OVERRIDES = {"train", "show-config", "data", "baseline", "plan", "eval"}


def shell_commands(markdown: str) -> list[str]:
  """The commands of the fenced shell blocks (```bash, ```sh or unlabelled), continuation
  lines joined; comment lines and other languages' blocks left out."""
  commands, block, language = [], [], None
  for line in markdown.splitlines():
    if line.strip().startswith("```"):
      if language is None:
        language, block = line.strip()[3:] or "sh", []
      else:
        if language in ("bash", "sh"):
          commands += _joined(block)
        language = None
    elif language is not None:
      block.append(line)
  return commands


def _joined(lines: list[str]) -> list[str]:
  out, pending, heredoc_end = [], "", None
  for line in lines:
    if heredoc_end is not None:  # a here-document's text is input, not commands
      heredoc_end = None if line.strip() == heredoc_end else heredoc_end
      continue
    if line.rstrip().endswith("\\"):
      pending += line.rstrip()[:-1] + " "
      continue
    command = (pending + line).strip()
    pending = ""
    if command and not command.startswith("#"):
      out.append(command)
      if "<<" in command:
        heredoc_end = command.split("<<", 1)[1].split()[0].strip("'\"")
  return out


def jaxlm_arguments(command: str) -> list[str] | None:
  """The arguments after `jaxlm` of a command that runs it, directly or through a launcher;
  None for any other command (or a program's output shown in a block). Shell comments are
  dropped."""
  if "launch/slurm.sbatch" in command.split("#")[0]:  # every argument goes to jaxlm train
    words = shlex.split(command, comments=True)
    return ["train", *words[words.index("launch/slurm.sbatch") + 1:]]
  if command.split()[0] not in ("jaxlm", *LAUNCHED):
    return None
  words = shlex.split(command, comments=True)
  if words[0] in LAUNCHED and "jaxlm" in words:
    words = words[words.index("jaxlm"):]
  return words[1:] if words[0] == "jaxlm" else None


def bench_arguments(command: str) -> tuple[Path, list[str]] | None:
  if "bench/" not in command.split("#")[0]:
    return None
  words = shlex.split(command, comments=True)
  for i, word in enumerate(words[:2]):
    if word.startswith("bench/") and word.endswith(".py") and (
        i == 0 or Path(words[0]).name.startswith("python")):
      return ROOT / word, words[i + 1:]
  return None


def help_commands(parser: argparse.ArgumentParser) -> list[str]:
  """The example commands of a parser's and its subcommands' help texts."""
  text = f"{parser.description or ''}\n{parser.epilog or ''}"
  examples = _joined([line for line in text.splitlines() if line.startswith("  ")])
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      for subparser in action.choices.values():
        examples += help_commands(subparser)
  return [c for c in examples if c.startswith("jaxlm ")]


PARSER = cli._parser()
HELP_COMMANDS = help_commands(PARSER)
COMMANDS = shell_commands((ROOT / "README.md").read_text()) + HELP_COMMANDS
JAXLM = [(c, arguments) for c in COMMANDS if (arguments := jaxlm_arguments(c)) is not None]
BENCH = [(c, *found) for c in COMMANDS if (found := bench_arguments(c)) is not None]


def test_the_readme_shows_commands_of_every_kind():
  subcommands = {arguments[0] for _, arguments in JAXLM if arguments}
  assert {"train", "generate", "convert", "eval", "plan", "data", "baseline", "profile",
          "show-config"} <= subcommands, subcommands
  assert len(HELP_COMMANDS) >= 30
  assert {path.name for _, path, _ in BENCH} >= {"train_throughput.py", "ceilings.py",
                                                   "attention_check.py"}


@pytest.mark.parametrize("command, arguments", JAXLM, ids=range(len(JAXLM)))
def test_each_jaxlm_command_parses_with_its_recipe_and_overrides(command, arguments):
  rest, overrides = cli._split_overrides(arguments)
  try:
    args = PARSER.parse_args(rest)
  except SystemExit:
    pytest.fail(f"`jaxlm` rejects the arguments of this example: {command}")
  preset = getattr(args, "preset", None)
  assert preset is None or preset in {**PRESETS, **ENCODER_PRESETS}, (
      f"no preset {preset!r}: {command}")
  if not overrides and not getattr(args, "config", None):
    return
  assert args.command in TAKES_OVERRIDES, f"{args.command} takes no --config: {command}"
  # A workdir's saved config has the recipes' keys; without --config, check against the
  # default recipe's.
  try:
    config_lib.load_config(getattr(args, "config", None) or config_lib.DEFAULT_RECIPE,
                           overrides)
  except config_lib.ConfigError as e:
    pytest.fail(f"{e}\nin the example: {command}")


@pytest.mark.parametrize("command, path, arguments", BENCH, ids=range(len(BENCH)))
def test_each_benchmark_command_parses(command, path, arguments, monkeypatch):
  monkeypatch.syspath_prepend(str(path.parent))  # as `python bench/x.py` has it
  spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    module.parse_args(arguments)
  except SystemExit:
    pytest.fail(f"{path.name} rejects the README's arguments: {command}")


def test_a_renamed_flag_or_key_is_caught():
  """The checks above can fail: a flag or key the code does not have is refused."""
  with pytest.raises(SystemExit):
    PARSER.parse_args(jaxlm_arguments("jaxlm train --work-dir runs/x"))
  with pytest.raises(config_lib.ConfigError):
    config_lib.load_config(config_lib.DEFAULT_RECIPE, ["--config.train.step=3"])
  assert jaxlm_arguments("launch/local.sh 2 jaxlm train --workdir w  # a comment") == [
      "train", "--workdir", "w"]
  assert shell_commands("```bash\njaxlm a \\\n  --b\n# c\n```\n```python\nx\n```") == [
      "jaxlm a    --b"]
