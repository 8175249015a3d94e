"""The command line, and bad input that must fail early with the numbers and the fix."""
import os
import subprocess
import sys

import pytest

from jaxlm import cli
from jaxlm.config import ConfigError, load_config
from jaxlm.parallel.mesh import build_mesh
from jaxlm.train.loop import train


def test_help_explains_commands():
  out = subprocess.run([sys.executable, "-m", "jaxlm.cli", "--help"], capture_output=True,
                       text=True, check=True).stdout
  assert "train" in out and "generate" in out
  out = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", "--help"],
                       capture_output=True, text=True, check=True).stdout
  assert "--config.SECTION.KEY=VALUE" in out and "resumes" in out


def test_unknown_config_key_names_the_closest(capsys):
  with pytest.raises(ConfigError, match=r"'optim.learing_rate'.*optim.learning_rate"):
    load_config("tiny_demo", ["--config.optim.learing_rate=1e-3"])
  assert cli.main(["train", "--workdir", "unused", "--config.trian.steps=3"]) == 2
  assert "Did you mean train.steps" in capsys.readouterr().err


def test_bad_value_type_is_reported():
  with pytest.raises(ConfigError, match="train.steps"):
    load_config("tiny_demo", ["--config.train.steps=many"])


def test_default_recipe_is_the_demo():
  config = load_config()
  assert config.model.preset == "demo" and config.data.sources == ("embedded",)


def test_mesh_size_must_match_devices():
  with pytest.raises(ValueError, match=r"uses 6 devices but 8 are available.*fsdp=-1"):
    build_mesh(dict(data=3, fsdp=2))
  with pytest.raises(ValueError, match=r"other axes use 3 devices.*8 available"):
    build_mesh(dict(data=3, fsdp=-1))


def test_batch_must_divide_over_data_parallel(tiny_config, tmp_path):
  with pytest.raises(ConfigError, match=r"not divisible by the data-parallel size .* = 8"):
    train(tiny_config(data__batch_size=12), tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def test_heads_must_divide_over_tensor(tiny_config, tmp_path):
  with pytest.raises(ConfigError, match=r"num_kv_heads = 2 is not divisible by mesh.tensor = 4"):
    train(tiny_config(mesh__fsdp=2, mesh__tensor=4), tmp_path)


def test_sequence_parallel_needs_a_sequence_that_divides_over_tensor(tiny_config, tmp_path):
  with pytest.raises(ConfigError, match=r"mesh.tensor = 2, which does not divide "
                                        r"data.seq_len = 33; use a seq_len that is a multiple"):
    train(tiny_config(mesh__fsdp=4, mesh__tensor=2, mesh__sequence_parallel=True,
                      data__seq_len=33), tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def test_tokenizer_larger_than_vocab(tiny_config, tmp_path):
  with pytest.raises(ConfigError, match=r"4096 tokens but model.vocab_size is 256"):
    train(tiny_config(model__vocab_size=256), tmp_path)


def test_train_then_generate_from_the_command_line(token_cache, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  overrides = ["--config.model.preset=tiny", "--config.model.vocab_size=4096",
               "--config.model.compute_dtype=float32", "--config.data.seq_len=32",
               "--config.data.batch_size=8", "--config.train.steps=2",
               "--config.train.eval_every=0", f"--config.data.cache_dir={token_cache}"]
  assert cli.main(["train", "--workdir", workdir, *overrides]) == 0
  assert '"loss"' in capsys.readouterr().out
  assert cli.main(["generate", "--model", workdir, "--prompt", "It is a truth",
                   "--max-new-tokens", "5"]) == 0
  text = capsys.readouterr().out
  assert text.startswith("It is a truth") and len(text.strip()) > len("It is a truth")


def test_a_second_run_loads_its_steps_from_the_compilation_cache(token_cache, tmp_path):
  cache = tmp_path / "xla"
  # Not the session's cache (conftest.py): this run's own, named by the config.
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}

  def train_in_a_process(name):
    subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", "--workdir",
                    str(tmp_path / name), "--config.model.preset=tiny",
                    "--config.model.vocab_size=4096", "--config.data.seq_len=32",
                    "--config.data.batch_size=8", "--config.train.steps=2",
                    "--config.train.eval_every=0", f"--config.data.cache_dir={token_cache}",
                    f"--config.train.compilation_cache_dir={cache}"],
                   env=env, check=True, capture_output=True)
    return set(os.listdir(cache))

  compiled = train_in_a_process("first")
  assert compiled  # the run's programs, the train step among them
  assert train_in_a_process("second") == compiled  # found every one: nothing compiled anew


@pytest.mark.parametrize("recipe", ["tiny_demo", "ref_1b", "tang_zh"])
def test_every_recipe_loads_and_builds(recipe):
  from jaxlm.config import model_config
  config = load_config(recipe)
  cfg = model_config(config)
  assert cfg.vocab_size >= 4096 and config.data.batch_size % 8 == 0
  # (sft_smollm2 starts from the real SmolLM2: tested in test_smollm2.py.)


def test_renamed_config_key_names_its_new_name():
  with pytest.raises(ConfigError, match="'data.corpus' is now 'data.sources'"):
    load_config("tiny_demo", ["--config.data.corpus=my.txt"])


def test_rows_longer_than_learned_positions_are_refused(tiny_config, tmp_path):
  config = tiny_config(model__position_embedding="learned", model__max_seq_len=16)
  with pytest.raises(ConfigError,
                     match=r"data.seq_len = 32 is longer than .* \(max_seq_len = 16\)"):
    train(config, tmp_path)
