"""Reading a partitioned program's collectives: replica-group forms, loop counts, the
partitioner's reduce-scatter, and the bytes that real compiled steps send along each mesh
axis (8 simulated devices from conftest)."""
import pytest

from jaxlm.models.config import from_preset
from jaxlm.parallel.collectives import (collectives, compile_with_partitioned_hlo,
                                        sent_bytes_by_axes)
from jaxlm.plan import BATCH_KEYS, experiment_config, plan
from jaxlm.train.loop import Run

# A module in the form XLA prints after SPMD partitioning, over a data=2 x fsdp=4 mesh
# (device d sits at data d // 4, fsdp d % 4): an all-gather in a loop of 3, a
# collective-permute in a loop of 5 inside it, and at the top an all-reduce that each device
# slices (a reduce-scatter), a tuple all-reduce, a reduction within single devices, and
# three all-reduces summed (as tensor parallelism sums q, k and v's input gradients) plus a
# fourth added in that is also used elsewhere.
MODULE = """\
HloModule jit_step, entry_computation_layout={()->()}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%inner_cond (p: (s32[], f32[64])) -> pred[] {
  %p = (s32[], f32[64]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%inner_body (p: (s32[], f32[64])) -> (s32[], f32[64]) {
  %p = (s32[], f32[64]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[64]{0} get-tuple-element(%p), index=1
  %permuted = f32[64]{0} collective-permute(%x), channel_id=3, source_target_pairs={{0,0},{4,2},{2,1}}
  ROOT %t = (s32[], f32[64]{0}) tuple(%i, %permuted)
}

%outer_cond (p: (s32[], bf16[64,64])) -> pred[] {
  %p = (s32[], bf16[64,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%outer_body (p: (s32[], bf16[64,64])) -> (s32[], bf16[64,64]) {
  %p = (s32[], bf16[64,64]{1,0}) parameter(0)
  %w = bf16[64,64]{1,0} get-tuple-element(%p), index=1
  %gathered = bf16[256,64]{1,0} all-gather(%w), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true, metadata={op_name="dot"}
  %init = (s32[], f32[64]{0}) parameter(1)
  %inner = (s32[], f32[64]{0}) while(%init), condition=%inner_cond, body=%inner_body
  ROOT %t = (s32[], bf16[64,64]{1,0}) tuple(%i, %w)
}

ENTRY %main.1 (g: bf16[256,64], a: f32[8], b: f32[], c: f32[16]) -> bf16[128,64] {
  %g = bf16[256,64]{1,0} parameter(0)
  %a = f32[8]{0} parameter(1)
  %b = f32[] parameter(2)
  %c = f32[16]{0} parameter(3)
  %summed = bf16[256,64]{1,0} all-reduce(%g), channel_id=2, replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_0'}, use_global_device_ids=true, to_apply=%add
  %off = s32[] partition-id()
  %zero = s32[] constant(0)
  %share = bf16[128,64]{1,0} dynamic-slice(%summed, %off, %zero), dynamic_slice_sizes={128,64}
  %sums = (f32[8]{0}, f32[]) all-reduce(%a, /*index=1*/%b), channel_id=4, replica_groups={{0,4},{1,5},{2,6},{3,7}}, use_global_device_ids=true, to_apply=%add
  %local = f32[16]{0} all-reduce(%c), channel_id=5, replica_groups={{0},{1},{2},{3},{4},{5},{6},{7}}, to_apply=%add
  %d1 = bf16[32]{0} parameter(5)
  %dq = bf16[32]{0} all-reduce(%d1), channel_id=6, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  %dk = bf16[32]{0} all-reduce(%d1), channel_id=7, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  %dv = bf16[32]{0} all-reduce(%d1), channel_id=8, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  %dqk = bf16[32]{0} add(%dq, %dk)
  %dx = bf16[32]{0} add(%dqk, %dv)
  %dw = bf16[32]{0} all-reduce(%d1), channel_id=9, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  %dxw = bf16[32]{0} add(%dx, %dw)
  %kept = bf16[32]{0} copy(%dw)
  %init = (s32[], bf16[64,64]{1,0}) parameter(4)
  %loop = (s32[], bf16[64,64]{1,0}) while(%init), condition=%outer_cond, body=%outer_body
  ROOT %out = bf16[128,64]{1,0} copy(%share)
}
"""
MESH = {"data": 2, "fsdp": 4}


def test_collectives_are_read_with_their_groups_axes_and_loop_counts():
  found = {c.name: c for c in collectives(MODULE, MESH)}
  # add(all-reduce, all-reduce) is one all-reduce of the sum on GPUs and TPUs; dw has
  # another user, so it is reduced on its own.
  assert set(found) == {"gathered", "permuted", "summed", "sums", "local", "dq", "dw"}
  assert found["dq"].sent_bytes == found["dw"].sent_bytes == 2 * 3 / 4 * 32 * 2
  gathered, permuted = found["gathered"], found["permuted"]
  # [2,4]<=[8]: rows of 4 consecutive devices, i.e. along fsdp; runs in the loop of 3.
  assert (gathered.kind, gathered.group, gathered.axes, gathered.count) == (
      "all-gather", 4, ("fsdp",), 3)
  assert gathered.bytes == 256 * 64 * 2 and gathered.sent_bytes == 3 / 4 * 256 * 64 * 2 * 3
  # Nested loops multiply; device 4 -> 2 crosses both axes.
  assert (permuted.count, permuted.axes, permuted.sent_bytes) == (15, ("data", "fsdp"), 64 * 4 * 15)
  # The transposed device order pairs 0 with 1 (fsdp), not 0 with 4 (data); every user
  # slices half: the partitioner's reduce-scatter.
  summed = found["summed"]
  assert (summed.kind, summed.group, summed.axes) == ("reduce-scatter", 2, ("fsdp",))
  assert summed.sent_bytes == 1 / 2 * 256 * 64 * 2
  sums = found["sums"]
  assert (sums.kind, sums.axes, sums.bytes, sums.sent_bytes) == (
      "all-reduce", ("data",), 8 * 4 + 4, 2 * 1 / 2 * 36)
  assert (found["local"].group, found["local"].sent_bytes) == (1, 0.0)
  assert sent_bytes_by_axes(list(found.values())) == {
      "data": 36.0, "data+fsdp": 64 * 4 * 15.0, "fsdp": 3 / 4 * 256 * 64 * 2 * 3 + 16384 + 192}


# Two partial sums reduce-scattered (each all-reduced, then sliced to the device's share) and
# added, as sequence parallelism's backward sums q, k and v's input gradients; a third
# sliced at another offset is not the same share, so it is not folded in.
SCATTERED_SUM = """\
HloModule jit_step, entry_computation_layout={()->()}

%add (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %sum = bf16[] add(%a, %b)
}

ENTRY %main (x: bf16[8,64], y: bf16[8,64], z: bf16[8,64], i: s32[]) -> bf16[8,16] {
  %x = bf16[8,64]{1,0} parameter(0)
  %y = bf16[8,64]{1,0} parameter(1)
  %z = bf16[8,64]{1,0} parameter(2)
  %i = s32[] parameter(3)
  %zero = s32[] constant(0)
  %one = s32[] constant(1)
  %rx = bf16[8,64]{1,0} all-reduce(%x), channel_id=1, replica_groups=[1,4]<=[4], use_global_device_ids=true, to_apply=%add
  %sx = bf16[8,16]{1,0} dynamic-slice(%rx, %zero, %i), dynamic_slice_sizes={8,16}
  %ry = bf16[8,64]{1,0} all-reduce(%y), channel_id=2, replica_groups=[1,4]<=[4], use_global_device_ids=true, to_apply=%add
  %sy = bf16[8,16]{1,0} dynamic-slice(%ry, %zero, %i), dynamic_slice_sizes={8,16}
  %sxy = bf16[8,16]{1,0} add(%sx, %sy)
  %rz = bf16[8,64]{1,0} all-reduce(%z), channel_id=3, replica_groups=[1,4]<=[4], use_global_device_ids=true, to_apply=%add
  %sz = bf16[8,16]{1,0} dynamic-slice(%rz, %one, %i), dynamic_slice_sizes={8,16}
  ROOT %total = bf16[8,16]{1,0} add(%sxy, %sz)
}
"""


def test_reduce_scatters_of_the_same_share_that_are_added_fold_into_one():
  found = {c.name: c for c in collectives(SCATTERED_SUM, {"tensor": 4})}
  assert sorted(found) == ["rx", "rz"]
  assert [found[name].kind for name in ("rx", "rz")] == ["reduce-scatter"] * 2
  assert found["rx"].sent_bytes == 3 / 4 * 8 * 64 * 2


def test_an_unknown_replica_group_form_names_the_collective():
  text = MODULE.replace("replica_groups=[2,4]<=[8]", "replica_groups=somehow")
  with pytest.raises(ValueError, match=r"all-gather %gathered: .*somehow"):
    collectives(text, MESH)


def _demo(layout, batch_size=8):
  (row,) = plan("demo", [layout], seq_len=128, batch_size=batch_size, hbm_gib=80)
  assert "traffic_error" not in row, row["traffic_error"]
  return row


def test_data_parallel_sends_its_gradients_once_over_data():
  """data=8: one all-reduce of the gradients, ring cost 2 x 7/8 of them, in the compute
  dtype (bf16) or float32 per parameter."""
  row = _demo({"data": 8})
  params = from_preset("demo").num_params()
  assert set(row["sent_by_axes"]) == {"data"}
  assert 2 * 7 / 8 * 2 * params <= row["sent_bytes"] <= 2 * 7 / 8 * 4 * params * 1.01


def test_tensor_traffic_grows_with_the_batch_and_fsdp_traffic_does_not():
  """fsdp moves weights, tensor parallelism moves activations: doubling the batch doubles
  the bytes sent over tensor and leaves those over fsdp as they were."""
  small, large = _demo({"fsdp": 4, "tensor": 2}), _demo({"fsdp": 4, "tensor": 2}, 16)
  assert set(small["sent_by_axes"]) >= {"fsdp", "tensor"}
  tensor = large["sent_by_axes"]["tensor"] / small["sent_by_axes"]["tensor"]
  fsdp = large["sent_by_axes"]["fsdp"] / small["sent_by_axes"]["fsdp"]
  assert 1.9 < tensor < 2.1 and 0.99 < fsdp < 1.05, (small, large)
  assert large["flops_per_sent_byte"] > small["flops_per_sent_byte"]


def _tensor_collectives_in_layers(remat, sequence_parallel=False):
  """fsdp=4 x tensor=2 demo step: ([(kind, bytes)] of the collectives over tensor that run
  once per layer, in program order; the activation's bytes on one device, [batch, seq,
  hidden] bf16; XLA's temp bytes)."""
  config, _ = experiment_config("demo", {"fsdp": 4, "tensor": 2}, seq_len=128, batch_size=8,
                                remat=remat,
                                overrides={"mesh.sequence_parallel": sequence_parallel})
  run = Run.build(config)
  compiled, hlo = compile_with_partitioned_hlo(
      run.trainer.lower_train_step({key: (8, 128) for key in BATCH_KEYS}))
  layers, hidden = from_preset("demo").num_layers, from_preset("demo").hidden_size
  activation = 8 // 4 * 128 * hidden * 2
  found = collectives(hlo, {"data": 1, "fsdp": 4, "tensor": 2})
  in_layers = [(c.kind, c.bytes) for c in found if c.axes == ("tensor",) and c.count == layers]
  return in_layers, activation, compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("remat, per_layer", [("none", 4), ("full", 5)])
def test_tensor_parallelism_reduces_activations_as_megatron_does(remat, per_layer):
  """Per layer: the attention and MLP outputs forward, the input gradients of each block
  backward (q, k and v's summed into one), and with full remat the recomputed attention
  output again; nothing else activation-sized crosses tensor inside the layers."""
  in_layers, activation, _ = _tensor_collectives_in_layers(remat)
  assert in_layers == [("all-reduce", activation)] * per_layer


@pytest.mark.parametrize("remat, gathers, scatters", [("none", 6, 4), ("full", 6, 5)])
def test_sequence_parallelism_splits_each_all_reduce_and_saves_memory(remat, gathers,
                                                                      scatters):
  """mesh.sequence_parallel: every all-reduce above becomes a reduce-scatter onto the
  residual stream's sequence shards (q, k and v's gradients summed before it), and each
  block's input is all-gathered from them (forward; with full remat, again in the
  recomputation), as is the gradient of each block's output (backward). Without remat the
  backward gathers each block's input once more for its weight gradients: the forward's
  gathered copy is not kept. Only the norms' scale gradients are all-reduced, and the step
  needs less memory."""
  in_layers, activation, temp = _tensor_collectives_in_layers(remat, sequence_parallel=True)
  large = sorted(c for c in in_layers if c[1] >= activation)
  assert large == ([("all-gather", activation)] * gathers
                   + [("reduce-scatter", activation)] * scatters)
  # The norms' scale gradients: each device saw part of the sequence.
  norm_scale = from_preset("demo").hidden_size * 4
  assert sorted(c for c in in_layers if c[1] < activation) == [("all-reduce", norm_scale)] * 2
  assert temp < _tensor_collectives_in_layers(remat)[2]


def test_hybrid_sharding_sends_only_gradients_between_nodes():
  """data=2 x fsdp=4, as mesh.data=NODES x mesh.fsdp=GPUS_PER_NODE: what crosses data is the
  gradient reduction, whose size does not depend on the batch; doubling the batch leaves it
  as it was (README, Scale out)."""
  small, large = _demo({"data": 2, "fsdp": 4}), _demo({"data": 2, "fsdp": 4}, 16)
  crossing = [axes for axes in small["sent_by_axes"] if "data" in axes.split("+")]
  params = from_preset("demo").num_params()
  data = small["sent_by_axes"]["data"]
  # Each device's quarter of the gradients (fsdp), bf16 or float32, all-reduced over 2.
  assert 2 * 1 / 2 * 2 * params / 4 <= data <= 2 * 1 / 2 * 4 * params / 4 * 1.01
  for axes in crossing:
    assert abs(large["sent_by_axes"][axes] - small["sent_by_axes"][axes]) <= 1e-3 * data, axes


def test_a_tied_tables_two_gradients_cross_devices_once():
  """The demo's table is both the embedding and the output projection. Both gradients come
  out in float32 and are added before the all-reduce, as GPU and TPU compilers reassociate
  them, so under data=8 the table's gradient crosses devices once, not twice. Under fsdp=8
  the table is gathered once, in bf16: the backward keeps the forward's gathered copy."""
  cfg = from_preset("demo")
  assert cfg.tie_embeddings
  table = f"[{cfg.vocab_size},{cfg.hidden_size}]"
  data, fsdp = plan("demo", [{"data": 8}, {"fsdp": 8}], seq_len=128, batch_size=8,
                    hbm_gib=80, top_collectives=1000)
  assert [c["shape"] for c in data["top_collectives"]].count("f32" + table) == 1
  gathered = [(c["shape"], c["count"]) for c in fsdp["top_collectives"]
              if c["kind"] == "all-gather" and c["shape"].endswith(table)]
  assert gathered == [("bf16" + table, 1)]
