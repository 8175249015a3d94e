#!/usr/bin/env bash
# Cloud TPU VMs and pod slices (v4-32, v5p-64, ...): every host ("worker") of a slice runs the
# same jaxlm command, and `--distributed auto` lets JAX find the others from the TPU metadata.
#
#   launch/tpu_pod.sh create my-pod us-central2-b v4-32 tpu-ubuntu2204-base [--spot ...]
#   launch/tpu_pod.sh install my-pod us-central2-b
#   launch/tpu_pod.sh run my-pod us-central2-b -- jaxlm train --config ref_1b \
#     --workdir /mnt/shared/runs/ref_1b
#   launch/tpu_pod.sh delete my-pod us-central2-b
#
# --workdir must be a filesystem all workers share (Filestore NFS, a gcsfuse mount): every
# worker writes its checkpoint shards there, and a restart must find all of them.
# `run` lasts as long as the ssh sessions: start it inside tmux/screen on your machine.
# `install` copies this checkout (tracked and untracked-but-not-ignored files) to ~/jaxlm on
# every worker and pip-installs it with jax[tpu] into ~/jaxlm/.venv; run it again after edits.
#
# Environment: DRY_RUN=1 prints the gcloud commands instead of running them; TPU_PROJECT sets
# --project; REMOTE_DIR (default jaxlm, under the remote home); JAX_TPU_SPEC is the pip spec
# for JAX with libtpu (default "jax[tpu]").
set -euo pipefail

usage() {
  cat >&2 <<EOF
usage: $0 create NAME ZONE ACCELERATOR VERSION [GCLOUD_ARGS...]
                                         e.g. v4-32 tpu-ubuntu2204-base --spot
       $0 install NAME ZONE              copy this checkout to every worker, pip install it
       $0 run NAME ZONE -- COMMAND...    run on every worker; jaxlm train gets
                                         --distributed auto
       $0 stop NAME ZONE                 stop the VMs (where the TPU type allows it)
       $0 delete NAME ZONE
Set DRY_RUN=1 to print the gcloud commands instead of running them.
EOF
  exit 2
}

remote_dir=${REMOTE_DIR:-jaxlm}
if ! [[ $remote_dir =~ ^[A-Za-z0-9._/-]+$ ]]; then
  echo "$0: REMOTE_DIR must be a plain relative or absolute path, got '$remote_dir'" >&2
  exit 2
fi
project_flag=()
if [[ -n ${TPU_PROJECT:-} ]]; then
  project_flag=(--project="$TPU_PROJECT")
fi

# Prints a command as a shell would need it typed: plain words as they are, others in single
# quotes (each ' written as '\'').
show() {
  local line="" word sq="'"
  for word in "$@"; do
    if ! [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      word="'${word//$sq/$sq\\$sq$sq}'"
    fi
    line="$line${line:+ }$word"
  done
  echo "$line"
}

# Runs a gcloud command, or with DRY_RUN=1 only prints it.
gcloud_tpu() {
  # ${a[@]+"${a[@]}"}: an empty array under `set -u` in the bash 3.2 of macOS workstations.
  local cmd=(gcloud compute tpus tpu-vm "$@" ${project_flag[@]+"${project_flag[@]}"})
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    show "${cmd[@]}"
  else
    "${cmd[@]}"
  fi
}

(( $# >= 1 )) || usage
action=$1
shift

case $action in
  create)
    (( $# >= 4 )) || usage
    name=$1 zone=$2 accelerator=$3 version=$4
    shift 4
    gcloud_tpu create "$name" --zone="$zone" --accelerator-type="$accelerator" \
      --version="$version" "$@"
    ;;

  install)
    (( $# == 2 )) || usage
    name=$1 zone=$2
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    tarball=$tmp/jaxlm.tar.gz
    # What git would commit, not .venv/ or runs/: the workers build their own environment.
    if [[ ${DRY_RUN:-0} == 1 ]]; then
      echo "# pack $repo (git ls-files --cached --others --exclude-standard) into $tarball"
    else
      (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
        | tar --null -T - -czf "$tarball")
    fi
    # TPU VM images ship python3 without the venv module on some versions: install it then.
    # The check at the end only imports: touching the TPUs would wait for every worker.
    setup="set -euo pipefail
mkdir -p $remote_dir
tar -xzf jaxlm.tar.gz -C $remote_dir && rm jaxlm.tar.gz
cd $remote_dir
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv || {
    sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv .venv
  }
fi
.venv/bin/pip install -q -U pip
.venv/bin/pip install -q -e . '${JAX_TPU_SPEC:-jax[tpu]}'
.venv/bin/python -c 'import jax, jaxlm; print(\"jax\", jax.__version__)'"
    gcloud_tpu scp "$tarball" "$name:jaxlm.tar.gz" --zone="$zone" --worker=all
    gcloud_tpu ssh "$name" --zone="$zone" --worker=all --command="$setup"
    ;;

  run)
    (( $# >= 4 )) && [[ $3 == -- ]] || usage
    name=$1 zone=$2
    shift 3
    command=("$@")
    # jaxlm train on a pod: let JAX read the slice's topology (unless told otherwise).
    is_train=0 previous=""
    for word in "${command[@]}"; do
      case $previous in
        jaxlm | */jaxlm | jaxlm.cli)
          if [[ $word == train ]]; then is_train=1; fi ;;
      esac
      previous=$word
    done
    if (( is_train )) && [[ " ${command[*]} " != *" --distributed"* ]]; then
      command+=(--distributed auto)
    fi
    # Quoted for the remote shell, word by word, so arguments with spaces survive.
    remote="cd $remote_dir && source .venv/bin/activate && exec $(printf '%q ' "${command[@]}")"
    gcloud_tpu ssh "$name" --zone="$zone" --worker=all --command="${remote% }"
    ;;

  stop | delete)
    (( $# == 2 )) || usage
    name=$1 zone=$2
    extra=()
    if [[ $action == delete ]]; then
      extra=(--quiet)  # no interactive prompt
    fi
    gcloud_tpu "$action" "$name" --zone="$zone" ${extra[@]+"${extra[@]}"}
    ;;

  -h | --help | help)
    usage
    ;;

  *)
    echo "$0: unknown command '$action'" >&2
    usage
    ;;
esac
