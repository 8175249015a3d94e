"""The launch scripts without a cluster: bash syntax; the gcloud commands tpu_pod.sh runs; what
slurm.sbatch hands each process of a 2-node job (srun and scontrol replaced by stand-ins that
record what they get), fed through the real `jaxlm train` entry point up to
jax.distributed.initialize; and which way jaxlm.parallel.distributed.initialize starts the
runtime in each environment. jax.distributed.initialize itself is replaced by a recorder: it
is the boundary to the cluster, not the thing under test."""
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import jax
import pytest

from jaxlm import cli
from jaxlm.parallel import distributed

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SBATCH = LAUNCH / "slurm.sbatch"
TPU_POD = LAUNCH / "tpu_pod.sh"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"  # no venv: the scripts must find jaxlm themselves


def _write_script(path: Path, text: str) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)
  return path


def _clean_env(**extra):
  drop = ("SLURM_", "SLURMD_", "JAXLM_", "JAX_LOCAL_DEVICE_IDS", "CUDA_VISIBLE_DEVICES",
          "VIRTUAL_ENV", "XLA_", "NCCL_", "TPU_PROJECT", "REMOTE_DIR", "DRY_RUN")
  env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
  env["PATH"] = SYSTEM_PATH
  env.update(extra)
  return env


# --- syntax and usage -------------------------------------------------------------------------

@pytest.mark.parametrize("script", sorted(LAUNCH.glob("*.sh")) + [SBATCH], ids=lambda p: p.name)
def test_scripts_parse_and_are_executable(script):
  result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert os.access(script, os.X_OK)
  assert "set -euo pipefail" in script.read_text()


@pytest.mark.parametrize("argv", [[str(TPU_POD)], [str(TPU_POD), "run", "pod", "zone"],
                                  [str(TPU_POD), "create", "pod"], [str(TPU_POD), "frobnicate"],
                                  [str(LAUNCH / "local.sh")], [str(LAUNCH / "cpu_devices.sh")]],
                         ids=["tpu-none", "tpu-run-no-command", "tpu-create-short", "tpu-unknown",
                              "local", "cpu_devices"])
def test_wrong_arguments_print_usage(argv):
  result = subprocess.run(argv, env=_clean_env(), capture_output=True, text=True, timeout=30)
  assert result.returncode == 2 and "usage:" in result.stderr


def test_sbatch_outside_slurm_says_to_submit_it(tmp_path):
  result = subprocess.run(["bash", str(SBATCH), "--workdir", "x"], env=_clean_env(),
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 2 and "submit it with sbatch" in result.stderr


# --- TPU pods -----------------------------------------------------------------------------------

@pytest.fixture
def fake_gcloud(tmp_path):
  """A gcloud that only records its arguments: DRY_RUN must never reach it."""
  record = tmp_path / "gcloud.calls"
  _write_script(tmp_path / "bin" / "gcloud",
                f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> {record}\nprintf "\\n" >> {record}\n')
  return tmp_path / "bin", record


def _tpu(fake_gcloud, *args, dry_run=True, **env):
  bin_dir, _ = fake_gcloud
  result = subprocess.run(
      [str(TPU_POD), *args], capture_output=True, text=True, timeout=30,
      env=_clean_env(PATH=f"{bin_dir}:{SYSTEM_PATH}", **({"DRY_RUN": "1"} if dry_run else {}),
                     **env))
  assert result.returncode == 0, result.stderr
  commands, pending = [], ""
  for line in result.stdout.splitlines(keepends=True):  # a quoted word may span lines
    pending += line
    try:
      words = shlex.split(pending)
    except ValueError:  # no closing quote yet
      continue
    if words[:1] == ["gcloud"]:
      commands.append(words)
    pending = ""
  assert not pending
  return commands


def _remote_words(argv):
  """The --command that gcloud ... ssh sends, split the way the remote shell will split it."""
  (command,) = [a for a in argv if a.startswith("--command=")]
  return shlex.split(command.removeprefix("--command="))


def test_tpu_run_reaches_every_worker_with_distributed_auto(fake_gcloud):
  (argv,) = _tpu(fake_gcloud, "run", "my-pod", "us-central2-b", "--", "jaxlm", "train",
                 "--config", "configs/x.py", "--workdir", "/mnt/shared/my run",
                 "--config.train.steps=10")
  assert argv[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod",
                      "--zone=us-central2-b", "--worker=all"]
  assert _remote_words(argv) == [
      "cd", "jaxlm", "&&", "source", ".venv/bin/activate", "&&", "exec", "jaxlm", "train",
      "--config", "configs/x.py", "--workdir", "/mnt/shared/my run", "--config.train.steps=10",
      "--distributed", "auto"]
  _, record = fake_gcloud
  assert not record.exists()  # printed, not run


def test_tpu_run_leaves_other_commands_and_explicit_flags_alone(fake_gcloud):
  (argv,) = _tpu(fake_gcloud, "run", "pod", "zone", "--", "python", "-c",
                 "import jax; print(jax.device_count())")
  assert _remote_words(argv)[-3:] == ["python", "-c", "import jax; print(jax.device_count())"]
  (argv,) = _tpu(fake_gcloud, "run", "pod", "zone", "--", "python", "-m", "jaxlm.cli", "train",
                 "--distributed", "auto", "--workdir", "w")
  words = _remote_words(argv)
  assert words.count("--distributed") == 1 and words[-2:] == ["--workdir", "w"]


def test_tpu_create_install_stop_delete(fake_gcloud):
  (create,) = _tpu(fake_gcloud, "create", "pod", "us-central2-b", "v4-32",
                   "tpu-ubuntu2204-base", "--spot", TPU_PROJECT="my-proj")
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod",
                    "--zone=us-central2-b", "--accelerator-type=v4-32",
                    "--version=tpu-ubuntu2204-base", "--spot", "--project=my-proj"]
  scp, ssh = _tpu(fake_gcloud, "install", "pod", "us-central2-b")
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5].endswith("jaxlm.tar.gz") and scp[6:] == ["pod:jaxlm.tar.gz",
                                                         "--zone=us-central2-b", "--worker=all"]
  assert ssh[4:8] == ["ssh", "pod", "--zone=us-central2-b", "--worker=all"]
  setup = ssh[-1].removeprefix("--command=")
  assert "tar -xzf jaxlm.tar.gz -C jaxlm" in setup
  assert ".venv/bin/pip install -q -e . 'jax[tpu]'" in setup
  assert _tpu(fake_gcloud, "stop", "pod", "z") == [
      ["gcloud", "compute", "tpus", "tpu-vm", "stop", "pod", "--zone=z"]]
  assert _tpu(fake_gcloud, "delete", "pod", "z") == [
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod", "--zone=z", "--quiet"]]


def test_tpu_commands_really_run_without_dry_run(fake_gcloud):
  _tpu(fake_gcloud, "run", "pod", "zone", "--", "jaxlm", "train", "--workdir", "w",
       dry_run=False)
  _, record = fake_gcloud
  (call,) = [c.split("\0")[:-1] for c in record.read_text().splitlines()]
  assert call[:6] == ["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=zone"]
  assert shlex.split(call[-1].removeprefix("--command="))[-4:] == [
      "--workdir", "w", "--distributed", "auto"]


# --- SLURM ----------------------------------------------------------------------------------

FAKE_SRUN = r"""#!/usr/bin/env bash
# srun stand-in: records its arguments, then runs the command once per task, one after the
# other, with the variables SLURM gives each task; exits with the highest task status.
printf '%s\0' "$@" > "$FAKE_RECORD/srun.args"
ntasks=1 per_node=1
while [[ $1 == --* ]]; do
  case $1 in
    --ntasks=*) ntasks=${1#*=} ;;
    --ntasks-per-node=*) per_node=${1#*=} ;;
  esac
  shift
done
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
status=0
for ((i = 0; i < ntasks; i++)); do
  local_id=$((i % per_node))
  if [[ -n ${FAKE_BIND_GPUS:-} ]]; then export CUDA_VISIBLE_DEVICES=$local_id; fi
  code=0
  SLURM_PROCID=$i SLURM_LOCALID=$local_id SLURM_NODEID=$((i / per_node)) \
    SLURMD_NODENAME=${hosts[i / per_node]} SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST \
    SLURM_STEP_NUM_NODES=${#hosts[@]} SLURM_NTASKS=$ntasks SLURM_STEP_NUM_TASKS=$ntasks \
    SLURM_STEP_ID=0 "$@" || code=$?
  if ((code > status)); then status=$code; fi
done
exit $status
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_RECORD/scontrol.calls"
if [[ $1 == show && $2 == hostnames ]]; then printf '%s\n' $FAKE_HOSTS; fi
"""

FAKE_JAXLM = r"""#!/usr/bin/env bash
# jaxlm stand-in: records what this process was given.
printf '%s\0' "$@" > "$FAKE_RECORD/task.$SLURM_PROCID.args"
env -0 > "$FAKE_RECORD/task.$SLURM_PROCID.env"
if [[ -n ${FAKE_HOLD_UNTIL:-} ]]; then
  touch "$FAKE_RECORD/started"
  while [[ ! -e $FAKE_HOLD_UNTIL ]]; do sleep 0.05; done
fi
exit "${FAKE_JAXLM_EXIT:-0}"
"""

TRAIN_ARGS = ["--config", "tiny_demo", "--workdir", "/shared/runs/x",
              "--config.train.steps=10"]


@pytest.fixture
def slurm(tmp_path):
  """Runs launch/slurm.sbatch as the batch step of a 2-node job with 4 GPUs per node."""
  record = tmp_path / "record"
  record.mkdir()
  _write_script(tmp_path / "bin" / "srun", FAKE_SRUN)
  _write_script(tmp_path / "bin" / "scontrol", FAKE_SCONTROL)
  venv = tmp_path / "venv"  # jaxlm is only reachable through JAXLM_VENV
  _write_script(venv / "bin" / "jaxlm", FAKE_JAXLM)
  (venv / "bin" / "activate").write_text(
      f'export VIRTUAL_ENV={venv}\nexport PATH="$VIRTUAL_ENV/bin:$PATH"\n')
  # What sbatch sets for the batch script of `sbatch --nodes=2 --gpus-per-node=4 ...`.
  job = {"SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242", "SLURM_JOB_NAME": "jaxlm",
         "SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURM_NODELIST": "gpu-a[01-02]",
         "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_NTASKS": "2",
         "SLURM_NPROCS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_TASKS_PER_NODE": "1(x2)",
         "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
         "SLURMD_NODENAME": "gpu-a01", "SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "4",
         "SLURM_CPUS_ON_NODE": "32", "SLURM_SUBMIT_DIR": str(tmp_path),
         "SLURM_SUBMIT_HOST": "login1", "CUDA_VISIBLE_DEVICES": "0,1,2,3",
         "JAXLM_VENV": str(venv), "XLA_FLAGS": "--xla_dump_to=/tmp/dump",
         "FAKE_RECORD": str(record), "FAKE_HOSTS": "gpu-a01 gpu-a02",
         "PATH": f"{tmp_path / 'bin'}:{SYSTEM_PATH}"}

  class Job:
    record_dir = record
    venv_dir = venv

    def env(self, **overrides):
      env = _clean_env(**job)
      env.update(overrides)
      return {k: v for k, v in env.items() if v is not None}

    def run(self, args=TRAIN_ARGS, **overrides):
      return subprocess.run(["bash", str(SBATCH), *args], env=self.env(**overrides),
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)

    def tasks(self):
      """[(argv, env)] of every process, by SLURM_PROCID."""
      out = []
      for i in range(len(list(record.glob("task.*.args")))):
        args = (record / f"task.{i}.args").read_text().split("\0")[:-1]
        env = dict(item.split("=", 1) for item in
                   (record / f"task.{i}.env").read_text().split("\0")[:-1])
        out.append((args, env))
      return out

    def srun_args(self):
      return (record / "srun.args").read_text().split("\0")[:-1]

    def scontrol_calls(self):
      path = record / "scontrol.calls"
      return path.read_text().splitlines() if path.exists() else []

  return Job()


@pytest.fixture
def jax_init(monkeypatch):
  """Records jax.distributed.initialize calls; clears the launch variables of this shell."""
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  for name in list(os.environ):
    if name.startswith(("SLURM_", "JAXLM_")):
      monkeypatch.delenv(name)
  return calls


def _through_the_cli(argv, env, monkeypatch, jax_init):
  """Runs the real `jaxlm` entry point with one process's argv and environment, training
  replaced by a recorder; returns (jax.distributed.initialize call, train's arguments)."""
  import jaxlm.train.loop
  trained = []
  monkeypatch.setattr(jaxlm.train.loop, "train", lambda config, workdir: trained.append(
      (config, workdir)) or {})
  with monkeypatch.context() as m:
    for name, value in env.items():
      if name.startswith(("SLURM_", "JAXLM_")):
        m.setenv(name, value)
    del jax_init[:]
    assert cli.main(argv) == 0
  (call,) = jax_init
  (train_args,) = trained
  return call, train_args


def test_slurm_one_process_per_node(slurm, monkeypatch, jax_init):
  result = slurm.run()
  assert result.returncode == 0, result.stderr
  assert "2 nodes x 1 processes, 4 GPUs each, coordinator gpu-a01:61586" in result.stdout
  srun = slurm.srun_args()
  assert srun[:7] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=32",
                      "--kill-on-bad-exit=0", "bash", "-c"]
  assert srun[8:] == ["jaxlm-task", "jaxlm", "train", *TRAIN_ARGS]
  tasks = slurm.tasks()
  assert len(tasks) == 2
  for i, (argv, env) in enumerate(tasks):
    assert argv == ["train", *TRAIN_ARGS]
    assert env["VIRTUAL_ENV"] == str(slurm.venv_dir)  # the venv was activated
    assert (env["JAXLM_COORDINATOR"], env["JAXLM_NUM_PROCESSES"], env["JAXLM_PROCESS_ID"]) == (
        "gpu-a01:61586", "2", str(i))  # 61586 = 61440 + 4242 % 4096, as JAX would pick
    assert env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"  # all 4 GPUs, not JAX's [SLURM_LOCALID]
    assert env["XLA_FLAGS"] == ("--xla_gpu_enable_latency_hiding_scheduler=true "
                                "--xla_dump_to=/tmp/dump")  # the user's flags last: they win
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    # The real CLI with this process's argv and environment: explicit coordinates win over
    # JAX's SLURM detection.
    call, (config, workdir) = _through_the_cli(argv, env, monkeypatch, jax_init)
    assert call == (("gpu-a01:61586",), {"num_processes": 2, "process_id": i})
    assert workdir == "/shared/runs/x" and config.train.steps == 10
  assert not any(c.startswith("requeue") for c in slurm.scontrol_calls())


@pytest.mark.parametrize("per_node, bind, expected_ids", [
    (4, False, ["0", "1", "2", "3"]),  # one process per GPU, each sees the node's 4
    (4, True, ["0", "0", "0", "0"]),  # SLURM bound each task to its own GPU
    (2, False, ["0,1", "2,3"]),  # two processes per node, two GPUs each
])
def test_slurm_several_processes_per_node(slurm, monkeypatch, jax_init, per_node, bind,
                                          expected_ids):
  result = slurm.run(SLURM_NTASKS_PER_NODE=str(per_node), SLURM_NTASKS=str(2 * per_node),
                     FAKE_BIND_GPUS="1" if bind else None)
  assert result.returncode == 0, result.stderr
  assert slurm.srun_args()[:4] == ["--nodes=2", f"--ntasks={2 * per_node}",
                                   f"--ntasks-per-node={per_node}",
                                   f"--cpus-per-task={32 // per_node}"]
  tasks = slurm.tasks()
  assert len(tasks) == 2 * per_node
  assert [env["JAX_LOCAL_DEVICE_IDS"] for _, env in tasks] == expected_ids * 2
  for i, (argv, env) in enumerate(tasks):
    assert env["JAXLM_PROCESS_ID"] == env["SLURM_PROCID"] == str(i)
    call, _ = _through_the_cli(argv, env, monkeypatch, jax_init)
    assert call == (("gpu-a01:61586",), {"num_processes": 2 * per_node, "process_id": i})


def test_slurm_settings_from_the_environment(slurm):
  result = slurm.run(JAXLM_PORT="12345", JAXLM_XLA_FLAGS="", XLA_FLAGS=None,
                     JAX_LOCAL_DEVICE_IDS="1", SLURM_GPUS_ON_NODE=None,
                     SLURM_GPUS_PER_NODE="h100:4")
  assert result.returncode == 0, result.stderr
  for _, env in slurm.tasks():
    assert env["JAXLM_COORDINATOR"] == "gpu-a01:12345"
    assert env["XLA_FLAGS"] == ""
    assert env["JAX_LOCAL_DEVICE_IDS"] == "1"  # the user's choice is kept


@pytest.mark.parametrize("overrides, message", [
    ({"SLURM_NTASKS_PER_NODE": "3", "SLURM_NTASKS": "6"}, "cannot split 4 GPUs evenly"),
    ({"JAXLM_VENV": None}, "set JAXLM_VENV"),
])
def test_slurm_refuses_broken_setups(slurm, overrides, message):
  result = slurm.run(**overrides)
  assert result.returncode == 2 and message in result.stderr
  assert not list(slurm.record_dir.glob("task.*"))


@pytest.mark.parametrize("exit_code, overrides, requeued", [
    (75, {}, True),  # saved before the time limit: run again
    (75, {"JAXLM_REQUEUE": "0"}, False),
    (75, {"SLURM_RESTART_COUNT": "50"}, False),  # JAXLM_MAX_REQUEUES (default 50) reached
    (1, {}, False),  # a crash is not requeued
    (0, {}, False),
])
def test_slurm_requeues_only_after_a_preemption_save(slurm, exit_code, overrides, requeued):
  result = slurm.run(FAKE_JAXLM_EXIT=str(exit_code), **overrides)
  assert result.returncode == exit_code
  assert ("requeue 4242" in slurm.scontrol_calls()) == requeued, result.stderr


def test_slurm_batch_shell_survives_sigterm_and_does_not_requeue(slurm, tmp_path):
  # scancel / preemption signal the batch shell too: it must keep waiting while the tasks save
  # (not forward the signal: a second SIGTERM stops jaxlm without saving), then not requeue.
  release = tmp_path / "release"
  proc = subprocess.Popen(["bash", str(SBATCH), *TRAIN_ARGS], cwd=tmp_path, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=slurm.env(FAKE_JAXLM_EXIT="75", FAKE_HOLD_UNTIL=str(release)))
  deadline = time.time() + 30
  while not (slurm.record_dir / "started").exists():
    assert time.time() < deadline and proc.poll() is None, proc.communicate()
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.5)
  assert proc.poll() is None  # still waiting for the tasks
  release.touch()
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 75, err
  assert "SIGTERM, waiting for the tasks to save" in err
  assert "not requeueing" in err and "requeue 4242" not in slurm.scontrol_calls()


# --- which way the runtime starts ---------------------------------------------------------------

def test_explicit_flags(jax_init):
  assert distributed.initialize("host:1234", 2, 1) == "process 1 of 2 (coordinator host:1234)"
  assert jax_init == [(("host:1234",), {"num_processes": 2, "process_id": 1})]


def test_jaxlm_environment(jax_init, monkeypatch):
  monkeypatch.setenv("JAXLM_COORDINATOR", "10.0.0.1:5555")
  monkeypatch.setenv("JAXLM_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAXLM_PROCESS_ID", "3")
  distributed.initialize()
  assert jax_init == [(("10.0.0.1:5555",), {"num_processes": 4, "process_id": 3})]


def test_flags_win_over_environment_and_explicit_wins_over_slurm(jax_init, monkeypatch):
  monkeypatch.setenv("SLURM_NTASKS", "8")
  monkeypatch.setenv("JAXLM_COORDINATOR", "env-host:1")
  monkeypatch.setenv("JAXLM_NUM_PROCESSES", "8")
  monkeypatch.setenv("JAXLM_PROCESS_ID", "7")
  distributed.initialize("flag-host:2", 2, 0)
  assert jax_init == [(("flag-host:2",), {"num_processes": 2, "process_id": 0})]


@pytest.mark.parametrize("slurm_ntasks, auto, detected", [
    ("2", False, True),  # srun with 2 tasks: JAX reads SLURM itself
    (None, True, True),  # --distributed auto (TPU pods)
    ("1", False, False),  # a single SLURM task is a single process
    (None, False, False),  # nothing: single process, no runtime
])
def test_auto_detection_and_single_process(jax_init, monkeypatch, slurm_ntasks, auto,
                                           detected):
  if slurm_ntasks:
    monkeypatch.setenv("SLURM_NTASKS", slurm_ntasks)
  how = distributed.initialize(auto=auto)
  if detected:
    assert jax_init == [((), {})] and "auto-detected" in how
  else:
    assert jax_init == [] and how == "single process"


@pytest.mark.parametrize("flags, env", [
    (dict(coordinator="host:1"), {}),
    (dict(num_processes=2, process_id=0), {}),
    ({}, {"JAXLM_COORDINATOR": "host:1", "JAXLM_PROCESS_ID": "0"}),
])
def test_partial_coordinates_are_a_clear_error(jax_init, monkeypatch, flags, env):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match="need all of --coordinator, --num-processes and "
                                       "--process-id"):
    distributed.initialize(**flags)
  assert jax_init == []


def test_partial_coordinates_on_the_command_line(jax_init, capsys):
  assert cli.main(["train", "--coordinator", "host:1", "--workdir", "w"]) == 2
  assert "jaxlm train: error: Multi-process runs need all of" in capsys.readouterr().err
  assert jax_init == []
