#!/usr/bin/env bash
# N processes of one jaxlm command on this machine, joined by jax.distributed on 127.0.0.1,
# each with its own simulated CPU devices: a multi-host run you can debug on a laptop.
#   launch/local.sh 2 jaxlm train --workdir runs/mp --cpu-devices 4 --config.mesh.fsdp=8
# Process i's output goes to stdout (i = 0) or WORKLOG_DIR/process_i.log (default /tmp).
set -euo pipefail
if [[ $# -lt 2 || ! $1 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_PROCESSES COMMAND [ARGS...]" >&2
  exit 2
fi
n=$1; shift
port=${JAXLM_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
logs=${WORKLOG_DIR:-/tmp}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export JAXLM_COORDINATOR=127.0.0.1:$port JAXLM_NUM_PROCESSES=$n
pids=()
for ((i = n - 1; i >= 0; i--)); do
  if ((i == 0)); then
    JAXLM_PROCESS_ID=0 "$@" & pids+=($!)
  else
    JAXLM_PROCESS_ID=$i "$@" > "$logs/process_$i.log" 2>&1 & pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
