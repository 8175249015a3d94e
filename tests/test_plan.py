"""The memory planner: sharded state sizes, ahead-of-time compiled memory, layouts that
cannot work, and the `plan` command (8 simulated devices from conftest)."""
import json
import math
import os
import subprocess
import sys

import pytest

from jaxlm import plan_cli
from jaxlm.models.config import from_preset
from jaxlm.plan import GIB, format_table, max_batch, plan, standard_layouts

LLAMA3_8B = dict(seq_len=2048, batch_size=8, hbm_gib=80)


@pytest.fixture(scope="module")
def compiled_8b_fsdp():
  """The one compile of this file: about 4 s on 2 cores, thanks to the scan over layers."""
  (row,) = plan("llama3-8b", [{"fsdp": 8}], **LLAMA3_8B)
  return row


def test_fsdp_shards_8b_train_state_within_1_1x_of_ideal():
  fsdp, dp = plan("llama3-8b", [{"fsdp": 8}, {"data": 8}], **LLAMA3_8B, compile_step=False)
  num_params = from_preset("llama3-8b").num_params()
  # fp32 parameters plus AdamW's two fp32 moments; step, rng and counters are bytes.
  assert abs(fsdp["state_total_bytes"] - 12 * num_params) < 1024
  assert fsdp["state_total_bytes"] / 8 <= fsdp["state_bytes"] <= 1.1 * fsdp["state_total_bytes"] / 8
  assert fsdp["param_bytes"] <= 1.1 * 4 * num_params / 8
  assert fsdp["state_ratio"] <= 1.1
  assert dp["state_ratio"] > 7.99 and dp["state_bytes"] > 89 * GIB


def test_compiled_8b_fsdp_step_donates_its_state(compiled_8b_fsdp):
  row = compiled_8b_fsdp
  # input_ids, targets, loss_mask, positions, segment_ids: int32 [8, 2048], as jaxlm train
  # feeds them
  batch_shard = 5 * 8 * 2048 * 4 // 8
  assert row["argument_bytes"] == row["state_bytes"] + batch_shard
  # The new state is written over the donated one, so it is not counted twice.
  assert row["alias_bytes"] == row["state_bytes"]
  assert row["peak_bytes"] == (row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"]
                               + row["temp_bytes"] + row["code_bytes"])
  assert row["state_bytes"] < row["peak_bytes"] < 80 * GIB and row["fits"] is True


def test_compiled_8b_fsdp_step_gathers_weights_and_scatters_gradients(compiled_8b_fsdp):
  """Over fsdp=8, with full remat, each layer's weights are gathered twice (forward, and
  again for the recomputed forward and the backward) and their gradients reduce-scattered
  once, all in bf16; the output projection is gathered in bf16 and its gradient scattered
  in float32. Each moves 7/8 of its bytes; the rest (the embedding's all-to-all, scalar
  sums) is under 0.1 %."""
  row, cfg = compiled_8b_fsdp, from_preset("llama3-8b")
  head = cfg.vocab_size * cfg.hidden_size
  layers = cfg.num_params(include_embedding=False) - head
  expected = 7 / 8 * (3 * 2 * layers + 2 * head + 4 * head)
  assert set(row["sent_by_axes"]) == {"fsdp"}
  assert expected <= row["sent_bytes"] <= 1.001 * expected, (row["sent_bytes"], expected)
  tokens = 8 * 2048
  assert row["flops_per_device"] == from_preset("llama3-8b").flops_per_token(2048) * tokens / 8
  assert row["flops_per_sent_byte"] == row["flops_per_device"] / row["sent_bytes"]


def test_layouts_that_cannot_work_say_why():
  rows = plan("tiny", [{"tensor": 8}, {"fsdp": 4}, {"fdsp": 8}, {"data": 8}], seq_len=64,
              batch_size=4, hbm_gib=1, compile_step=False)
  errors = [row["error"] for row in rows]
  assert "num_heads = 4 is not divisible by mesh.tensor = 8" in errors[0]
  assert "uses 4 devices but 8 are available" in errors[1]
  assert "Unknown mesh axes ['fdsp']" in errors[2]
  assert "not divisible by the data-parallel size data x fsdp = 8" in errors[3]
  assert all(row["fits"] is False for row in rows)


def test_overrides_reach_the_model():
  two, four = (plan("tiny", [{"fsdp": 8}], seq_len=64, batch_size=8, hbm_gib=1,
                    compile_step=False, overrides=overrides)[0]
               for overrides in ({}, ["--config.model.num_layers=4"]))
  assert four["param_bytes"] > 1.5 * two["param_bytes"]


def test_attention_is_planned_as_accelerators_run_it():
  """A decoder's attention is planned with the splash flash kernel where the length tiles:
  without remat its temp then lacks XLA's saved [seq, seq] scores. An explicit
  attention_impl wins; other lengths keep XLA's."""

  def row(preset="tiny", seq_len=512, overrides=None, compile_step=True):
    return plan(preset, [{"fsdp": 8}], seq_len=seq_len, batch_size=8, hbm_gib=1,
                remat="none", overrides=overrides, compile_step=compile_step)[0]

  flash, dense = row(), row(overrides=["--config.model.attention_impl=xla"])
  assert (flash["attention_impl"], dense["attention_impl"]) == ("splash", "xla")
  # One device's saved float32 scores: a row, 4 heads, 2 layers of [512, 512].
  scores = 1 * 4 * 2 * 512 * 512 * 4
  assert dense["temp_bytes"] - flash["temp_bytes"] > scores, (dense, flash)
  assert row(seq_len=100, compile_step=False)["attention_impl"] == "xla"


def test_encoders_plan_their_masked_lm_and_classifier_steps():
  """A headless encoder plans the masked-LM step `jaxlm train` runs, without the tokenizer it
  would mask with; one with a classification head plans that."""
  mlm, classifier = (plan("bert-tiny", [{"fsdp": 4, "tensor": 2}], seq_len=64, batch_size=8,
                          hbm_gib=1, overrides=overrides)[0]
                     for overrides in ({}, {"model.num_labels": 3, "data.labels": ("a", "b", "c"),
                                            "data.format": "classification",
                                            "data.add_special_tokens": True}))
  for row in (mlm, classifier):
    assert "error" not in row, row["error"]
    assert row["fits"] and set(row["sent_by_axes"]) >= {"fsdp", "tensor"}
  # The masked-LM head's vocabulary-sized weights and logits are the difference.
  assert mlm["param_bytes"] > classifier["param_bytes"] and mlm["temp_bytes"] > classifier["temp_bytes"]


def test_a_recipe_plans_the_run_it_would_make():
  """--config RECIPE plans that recipe's model at its own shape (tiny_demo: the demo preset,
  8 rows of 256 tokens); with LoRA, data parallelism sends only the adapters' gradients."""
  full, lora = (plan(None, [{"data": 8}], seq_len=None, batch_size=None, hbm_gib=1,
                     optimizer=None, grad_accum=None, recipe="tiny_demo", overrides=overrides)[0]
                for overrides in ({}, {"finetune.lora_targets": "attention|mlp"}))
  assert "error" not in full and "error" not in lora
  assert full["argument_bytes"] - full["state_bytes"] == 5 * 8 * 256 * 4 // 8
  assert full["param_bytes"] == 4 * from_preset("demo").num_params()
  assert set(lora["sent_by_axes"]) == {"data"}
  assert lora["sent_bytes"] < 0.2 * full["sent_bytes"]


def test_max_batch_is_the_largest_batch_that_fits():
  """Doubling then bisecting in steps of the rows the layout splits a batch over; a limit
  that still fits is marked; a layout that cannot work says why."""
  shape = dict(seq_len=32, overrides={"model.num_layers": 1})
  hbm_gib = plan("tiny", [{"fsdp": 8}], batch_size=16, hbm_gib=1, **shape)[0]["peak_bytes"] / GIB
  found = max_batch("tiny", {"fsdp": 8}, hbm_gib=hbm_gib, **shape)
  assert (found["max_batch"], found["rows_per_device"], found["capped"]) == (16, 2, False)
  assert [batch for batch, _ in found["probes"]] == [8, 16, 32, 24]
  peaks = dict(found["probes"])
  assert peaks[8] < peaks[16] <= hbm_gib * GIB < peaks[24] < peaks[32]
  assert found["tokens_per_step"] == 16 * 32 and found["peak_bytes"] == peaks[16]
  capped = max_batch("tiny", {"data": 2, "fsdp": 4}, hbm_gib=80, limit=8, **shape)
  assert (capped["max_batch"], capped["capped"], len(capped["probes"])) == (8, True, 1)
  assert "not divisible" in max_batch("tiny", {"tensor": 8}, hbm_gib=80, **shape)["error"]


def test_standard_layouts_cover_dp_fsdp_tp_and_mixes():
  layouts = standard_layouts(8)
  assert {"data": 8} in layouts and {"fsdp": 8} in layouts and {"tensor": 8} in layouts
  assert {"fsdp": 4, "tensor": 2} in layouts and {"data": 2, "fsdp": 4} in layouts
  assert len({tuple(sorted(layout.items())) for layout in layouts}) == len(layouts)
  assert all(math.prod(layout.values()) == 8 for layout in layouts)
  assert [layout for layout in layouts if len(layout) == 3] == [
      {"data": 2, "fsdp": 2, "tensor": 2}]
  # 64 = 2^6 split into three factors of 2 or more: C(5, 2) ways.
  layouts = standard_layouts(64)
  assert len([layout for layout in layouts if len(layout) == 3]) == 10
  assert {"data": 8, "fsdp": 4, "tensor": 2} in layouts
  assert all(math.prod(layout.values()) == 64 for layout in layouts)


def test_table_shows_sizes_fit_and_errors(compiled_8b_fsdp):
  error = plan("llama3-8b", [{"fsdp": 8}], seq_len=2048, batch_size=4, hbm_gib=80,
               compile_step=False)
  table = format_table([compiled_8b_fsdp, *error]).splitlines()
  assert table[0].split() == ["devices", "layout", "params+opt", "GiB/dev", "x", "ideal",
                              "temp", "GiB", "peak", "GiB", "fits", "sent", "GiB/step", "over",
                              "axes", "FLOP/B", "compile", "s"]
  cells = table[2].split()
  assert cells[:4] == ["8", "fsdp=8", "11.22", "1.000"] and "yes" in cells
  sent = f"{compiled_8b_fsdp['sent_bytes'] / GIB:.2f}"
  assert cells[-5:-1] == [sent, "fsdp", sent, f"{compiled_8b_fsdp['flops_per_sent_byte']:,.0f}"]
  assert table[3].split()[:3] == ["8", "fsdp=8", "error:"]
  assert "not divisible by the data-parallel size data x fsdp = 8" in table[3]


def test_plan_command(capsys):
  code = plan_cli.main(["--preset", "tiny", "--mesh", "fsdp=8", "--mesh", "tensor=8",
                        "--seq-len", "64", "--no-compile"])
  table = capsys.readouterr().out
  assert code == 2  # a layout that was asked for cannot work
  assert "fsdp=8" in table and "error: model.num_heads = 4" in table
  assert plan_cli.main(["--preset", "tiny", "--sweep", "--seq-len", "64", "--no-compile",
                        "--json", "--config.model.num_layers=4"]) == 0
  rows = json.loads(capsys.readouterr().out)
  assert len(rows) == len(standard_layouts(8))
  assert plan_cli.main(["--preset", "tiny", "--mesh", "fsdp=8", "--seq-len", "32",
                        "--max-batch", "--batch-limit", "8", "--config.model.num_layers=1"]) == 0
  table = capsys.readouterr().out.splitlines()
  assert table[0].split()[2:4] == ["max", "batch"] and table[2].split()[2:4] == ["8+", "1"]
  assert table[3] == "attention planned as: xla"


def test_plan_command_lists_the_largest_collectives(capsys):
  assert plan_cli.main(["--preset", "tiny", "--mesh", "fsdp=4,tensor=2", "--seq-len", "64",
                        "--top-collectives", "3"]) == 0
  out = capsys.readouterr().out
  block = out[out.index("fsdp=4 tensor=2: the collectives that send the most"):].splitlines()
  assert block[1].split() == ["GiB/step", "kind", "axes", "runs", "shape", "op"]
  rows = [line.split() for line in block[2:]]
  assert len(rows) == 3 and all(row[1] in ("all-gather", "all-reduce", "reduce-scatter")
                                and row[2] in ("fsdp", "tensor") and "dot_general" in row[5]
                                for row in rows)
  sent = [float(row[0]) for row in rows]
  assert sent == sorted(sent, reverse=True)


def test_plan_command_plans_sequence_parallelism(capsys):
  """The override reaches the planned step (its largest collectives gather and scatter
  activations over tensor instead of all-reducing them), and the output says so."""
  assert plan_cli.main(["--preset", "tiny", "--mesh", "fsdp=4,tensor=2", "--seq-len", "64",
                        "--batch-size", "8", "--top-collectives", "4",
                        "--config.mesh.sequence_parallel=True"]) == 0
  out = capsys.readouterr().out
  assert "sequence parallel: the residual stream split over tensor" in out
  block = out[out.index("fsdp=4 tensor=2: the collectives that send the most"):].splitlines()
  assert {tuple(line.split()[1:3]) for line in block[2:6]} == {
      ("all-gather", "tensor"), ("reduce-scatter", "tensor")}


def test_plan_command_takes_a_preset_or_a_recipe(capsys):
  assert plan_cli.main(["--config", "tiny_demo", "--mesh", "fsdp=8", "--no-compile",
                        "--json"]) == 0
  (row,) = json.loads(capsys.readouterr().out)
  assert row["layout"] == "fsdp=8" and "error" not in row
  # --max-batch reads the recipe's sequence length (here set through the config).
  assert plan_cli.main(["--config", "tiny_demo", "--mesh", "fsdp=8", "--max-batch",
                        "--batch-limit", "8", "--json", "--config.model.num_layers=1",
                        "--config.data.seq_len=32"]) == 0
  (row,) = json.loads(capsys.readouterr().out)
  assert (row["max_batch"], row["tokens_per_step"]) == (8, 8 * 32)
  assert plan_cli.main(["--mesh", "fsdp=8"]) == 2
  assert "give --preset NAME, or --config RECIPE" in capsys.readouterr().err
  assert plan_cli.main(["--config", "no_such_recipe", "--sweep", "--no-compile"]) == 2
  out = capsys.readouterr()
  assert "No config file 'no_such_recipe'" in out.err and not out.out


def test_plan_command_refuses_a_device_count_jax_does_not_have(capsys):
  assert plan_cli.main(["--preset", "tiny", "--mesh", "fsdp=4", "--no-compile"]) == 2
  assert "plan is for 4 devices but JAX has 8" in capsys.readouterr().err


def test_plan_command_simulates_the_devices_it_needs():
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one CPU device by default
  out = subprocess.run(
      [sys.executable, "-m", "jaxlm.plan_cli", "--preset", "tiny", "--devices", "4",
       "--sweep", "--no-compile", "--json", "--seq-len", "64"],
      env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  rows = json.loads(out.stdout)
  assert {row["layout"] for row in rows} >= {"data=4", "fsdp=4", "fsdp=2 tensor=2"}
  assert all(row["devices"] == 4 for row in rows)
  assert "error" in next(row for row in rows if row["layout"] == "tensor=4")  # 2 kv heads


def test_plan_reads_collectives_with_the_persistent_compilation_cache_on(tmp_path):
  """An executable served from JAX's persistent cache is not compiled, so XLA would write no
  program to read: plan compiles its steps with the cache off, and leaves it on for the
  rest of the process. Run twice, the second run finds its step in the cache."""
  from tests.conftest import one_device_env

  env = dict(one_device_env(), JAX_COMPILATION_CACHE_DIR=str(tmp_path),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  command = [sys.executable, "-m", "jaxlm.plan_cli", "--preset", "tiny", "--mesh", "fsdp=4",
             "--devices", "4", "--seq-len", "64", "--json"]
  for _ in range(2):
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads(out.stdout)
    assert "traffic_error" not in row and set(row["sent_by_axes"]) == {"fsdp"}, row
  assert any(tmp_path.iterdir())  # other compiles still went to the cache
