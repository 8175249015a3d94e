"""Load the latest checkpoint of a training workdir and sample from it."""
from __future__ import annotations

import json
from pathlib import Path

import ml_collections

from jaxlm import config as config_lib
from jaxlm.checkpoint import Checkpointer
from jaxlm.data.text import end_of_text_id, load_tokenizer
from jaxlm.generate.greedy import greedy_generate


def load_run_config(workdir: Path) -> ml_collections.ConfigDict:
  path = workdir / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: is {workdir} a `jaxlm train` workdir?")
  config = config_lib.base_config()
  saved = json.loads(path.read_text())
  saved["mesh"]["rules"] = [tuple(r) for r in saved["mesh"]["rules"]]
  config.update_from_flattened_dict(_flatten(saved))
  return config


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and key != "rope_scaling":
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
  return out


def generate_from_workdir(workdir: str | Path, prompt: str, max_new_tokens: int) -> str:
  from jaxlm.train.loop import Run

  workdir = Path(workdir).expanduser().absolute()
  config = load_run_config(workdir)
  with config.unlocked():  # sample on whatever devices this machine has
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
  run = Run.build(config)
  checkpointer = Checkpointer(workdir / "checkpoints", every=1, keep=1)
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {workdir / 'checkpoints'} yet.")
  state, _ = checkpointer.restore(step, run.trainer.abstract_state())
  checkpointer.close()
  tokenizer = load_tokenizer(config.data.tokenizer)
  prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
  new_ids = greedy_generate(run.trainer.graphdef, state["params"], prompt_ids, max_new_tokens,
                            stop_id=end_of_text_id(tokenizer))
  return prompt + tokenizer.decode(new_ids)
