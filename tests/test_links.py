"""Time bounds of a plan on a cluster (jaxlm.parallel.links): which mesh axes cross hosts,
the rates of each kind of link, and the bound on a step (8 simulated devices)."""
import json
import re

import numpy as np
import pytest

from jaxlm import plan_cli
from jaxlm.parallel.links import crosses_hosts, device_hosts, rates_for, step_bound
from jaxlm.parallel.mesh import MESH_AXES, build_mesh
from jaxlm.plan import GIB, fastest, format_table, plan


def test_the_last_mesh_axes_stay_within_a_host():
  hosts = device_hosts(build_mesh({"data": 2, "fsdp": 2, "tensor": 2}), devices_per_host=4)
  assert hosts.tolist() == [[[0, 0], [0, 0]], [[1, 1], [1, 1]]]
  assert not crosses_hosts(hosts, MESH_AXES, ("tensor",))
  assert not crosses_hosts(hosts, MESH_AXES, ("fsdp", "tensor"))
  assert crosses_hosts(hosts, MESH_AXES, ("data",))
  assert crosses_hosts(hosts, MESH_AXES, ("data", "tensor"))
  # Hosts of 2: fsdp's groups, {0, 2} and {1, 3}, now span two hosts each.
  hosts = device_hosts(build_mesh({"data": 2, "fsdp": 2, "tensor": 2}), devices_per_host=2)
  assert crosses_hosts(hosts, MESH_AXES, ("fsdp",))
  assert not crosses_hosts(hosts, MESH_AXES, ("tensor",))


def test_devices_of_several_processes_are_on_their_process_host():
  class Device:
    def __init__(self, id, process_index):
      self.id, self.process_index = id, process_index

  class Mesh:  # 2 processes of 2 devices each, whatever devices_per_host says
    devices = np.array([[Device(0, 0), Device(1, 0)], [Device(2, 1), Device(3, 1)]])

  assert device_hosts(Mesh(), devices_per_host=8).tolist() == [[0, 0], [1, 1]]


def test_rates_of_known_devices_and_given_links():
  h100 = rates_for("NVIDIA H100 80GB HBM3")
  assert (h100.flops, h100.host_link, h100.network) == (989e12, 450e9, 50e9)
  assert rates_for("h100", (900, 25)).network == 25e9
  assert rates_for("cpu") is None and rates_for("cpu", (10, 1)) is None  # no peak FLOP/s
  assert h100.describe(8) == ("NVIDIA H100 80GB HBM3 rates: 989 TFLOP/s, 3.35 TB/s, 450 GB/s "
                              "within hosts of 8, 50 GB/s between hosts")
  # Measured ceilings in place of the datasheet's: MFU still counts against the datasheet.
  measured = rates_for("h100", peak_rates=(798, 3.0))
  assert (measured.flops, measured.memory, measured.mfu_flops) == (798e12, 3e12, 989e12)
  assert rates_for("cpu", (10, 1), (2, 0.1)).mfu_flops == 2e12  # no datasheet: the given


def test_a_step_takes_the_longer_of_its_compute_and_its_collectives():
  h100 = rates_for("h100")
  bound = step_bound(989e12 * 0.1, {"host": 450e9 * 0.02, "network": 50e9 * 0.03}, h100)
  assert bound["compute_s"] == pytest.approx(0.1)
  assert bound["comm_by_link_s"] == pytest.approx({"host": 0.02, "network": 0.03})
  assert bound["comm_s"] == pytest.approx(0.05) and bound["mfu_at_most"] == pytest.approx(1)
  slow = step_bound(989e12 * 0.1, {"host": 0.0, "network": 50e9 * 0.4}, h100)
  assert slow["mfu_at_most"] == pytest.approx(0.25)
  # Kernels that take longer than the model's FLOPs at peak (memory-bound ones, remat's
  # recomputation) lengthen the compute.
  kernels = step_bound(989e12 * 0.1, {"host": 450e9 * 0.02}, h100, kernels_s=0.125)
  assert kernels["model_flops_s"] == pytest.approx(0.1)
  assert kernels["compute_s"] == 0.125 and kernels["mfu_at_most"] == pytest.approx(0.8)
  # At a measured 798 TFLOP/s the same FLOPs take longer, and MFU is still of 989.
  measured = step_bound(989e12 * 0.1, {}, rates_for("h100", peak_rates=(798, 3.0)))
  assert measured["step_s"] == pytest.approx(0.1 * 989 / 798)
  assert measured["mfu_at_most"] == pytest.approx(798 / 989)


def test_the_fastest_layouts_are_those_with_the_shortest_bound_that_fit():
  def row(layout, compute_ms, comm_ms, peak_gib, fits=True):
    return {"layout": layout, "fits": fits, "peak_bytes": peak_gib * GIB,
            "bound": {"step_s": max(compute_ms, comm_ms) / 1e3}}

  rows = [row("a", 100, 150, 20), row("b", 100, 90, 30), row("c", 100, 50, 20),
          row("d", 100, 10, 90, fits=False), row("e", 100, 100.5, 10)]
  assert [r["layout"] for r in fastest(rows)] == ["e", "c", "b"]  # ties: least memory first
  assert fastest([rows[0], rows[3]]) == [rows[0]]
  assert fastest([rows[3]]) == [] and fastest([{"layout": "x", "fits": True}]) == []


def test_plan_splits_what_it_sends_between_host_links_and_the_network():
  """Hosts of 4: fsdp=4 gathers within a host, data=2 reduces gradients across the two;
  at a network 10x slower than NVLink, the data axis's fewer bytes take longer."""
  (row,) = plan("tiny", [{"data": 2, "fsdp": 4}], seq_len=64, batch_size=8, hbm_gib=80,
                devices_per_host=4, rates_of="h100", link_gbs=(500, 50))
  sent = row["sent_by_axes"]  # data+fsdp: the scalar sums over all 8
  assert set(sent) == {"data", "fsdp", "data+fsdp"}
  assert row["sent_by_link"] == {"host": sent["fsdp"],
                                 "network": sent["data"] + sent["data+fsdp"]}
  bound, network = row["bound"], row["sent_by_link"]["network"]
  assert network < sent["fsdp"]
  assert bound["comm_by_link_s"]["host"] == pytest.approx(sent["fsdp"] / 500e9)
  assert bound["comm_by_link_s"]["network"] == pytest.approx(network / 50e9)
  assert bound["comm_by_link_s"]["network"] > bound["comm_by_link_s"]["host"]
  assert bound["compute_s"] == pytest.approx(row["flops_per_device"] / 989e12)
  assert row["rates"] == ("h100 rates: 989 TFLOP/s, 3.35 TB/s, 500 GB/s within hosts of 4, "
                          "50 GB/s between hosts")
  header, _, cells = format_table([row]).splitlines()
  assert re.split(r"\s{2,}", header)[-3:] == ["compute ms", "comm ms", "MFU at most"]
  host_ms, network_ms = (bound["comm_by_link_s"][link] * 1e3 for link in ("host", "network"))
  assert f"{bound['comm_s'] * 1e3:.3g} ({host_ms:.3g} + {network_ms:.3g})" in cells
  # One host: everything goes over NVLink.
  (row,) = plan("tiny", [{"data": 2, "fsdp": 4}], seq_len=64, batch_size=8, hbm_gib=80,
                rates_of="h100")
  assert row["sent_by_link"]["network"] == 0 and row["bound"]["comm_by_link_s"]["network"] == 0


def test_plan_command_times_steps_only_with_known_rates(capsys):
  """Five compiles of a one-layer model: the CLI's columns, lines and refusals."""
  args = ["--preset", "tiny", "--mesh", "fsdp=8", "--seq-len", "64",
          "--config.model.num_layers=1"]
  assert plan_cli.main(args) == 0
  out = capsys.readouterr().out
  assert "MFU at most" not in out and "time bounds" not in out  # CPU: no peak rates
  assert plan_cli.main([*args, "--rates-of", "a100", "--devices-per-host", "4"]) == 0
  out = capsys.readouterr().out
  assert "MFU at most" in out.splitlines()[0]
  assert "shortest step" not in out  # one layout: nothing to compare
  assert ("time bounds at a100 rates: 312 TFLOP/s, 2.04 TB/s, 300 GB/s within hosts of 4, "
          "25 GB/s between hosts (datasheet figures, not measured") in out
  assert plan_cli.main([*args, "--mesh", "data=8", "--rates-of", "h100", "--hbm-gib", "1",
                        "--devices-per-host", "4"]) == 0
  assert re.search(r"shortest step that fits 1 GiB at those rates: [\d.e-]+ ms at least "
                   r"\(MFU at most \d+%\), by (fsdp|data)=8 \(0\.\d\d GiB\)",
                   capsys.readouterr().out)
  # --max-batch times the step at the batch it found.
  assert plan_cli.main([*args, "--rates-of", "h100", "--max-batch", "--batch-limit", "8",
                        "--json"]) == 0
  (row,) = json.loads(capsys.readouterr().out)
  assert row["max_batch"] == 8 and row["bound"]["compute_s"] > 0
  assert plan_cli.main([*args, "--rates-of", "tpu v9"]) == 2
  assert "No peak rates known for --rates-of 'tpu v9': use one of h100" in capsys.readouterr().err
  assert plan_cli.main([*args, "--link-gbs", "450,50"]) == 2
  assert "add --rates-of KIND" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    plan_cli.main([*args, "--link-gbs", "450"])
  assert "use HOST,NETWORK in GB/s" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    plan_cli.main([*args, "--peak-rates", "798,0"])
  assert "--peak-rates '798,0': rates must be positive" in capsys.readouterr().err
  # Given rates: a CPU plan is timed with them, and the line says which were given; nothing
  # fits a tiny HBM, and the plan says so.
  assert plan_cli.main([*args, "--peak-rates", "100,1", "--link-gbs", "20,2",
                        "--hbm-gib", "0.0001"]) == 0
  out = capsys.readouterr().out
  assert ("cpu rates: 100 TFLOP/s, 1.00 TB/s, 20 GB/s within hosts of 8, 2 GB/s between "
          "hosts (--peak-rates and --link-gbs as given, the rest datasheet figures") in out
  assert "no layout timed fits 0.0001 GiB: more devices, remat" in out
