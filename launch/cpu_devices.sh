#!/usr/bin/env bash
# Run a jaxlm command on N simulated CPU devices, to try data / FSDP / tensor layouts on a
# laptop before renting accelerators.
#   launch/cpu_devices.sh 8 jaxlm train --workdir runs/tp --config.mesh.tensor=2
set -euo pipefail
if [[ $# -lt 2 || ! $1 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_DEVICES COMMAND [ARGS...]" >&2
  exit 2
fi
n=$1; shift
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$n"
exec "$@"
