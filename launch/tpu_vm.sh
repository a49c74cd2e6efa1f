#!/usr/bin/env bash
# Runs fp_jax on every worker of a Cloud TPU VM (a single host or a pod slice).
#
#   launch/tpu_vm.sh TPU_NAME ZONE [--project=P] [--setup] -- --config=configs/cifar.py \
#       --workdir=/mnt/runs/cifar [--config.KEY=VALUE ...]
#
# The same command runs on all workers (gcloud ... ssh --worker=all); each worker is one
# JAX process and `--coordinator_address=auto` makes jax.distributed detect the pod
# (process ids, coordinator) from the TPU metadata. Every process loads its own rows of
# each global batch; process 0 writes the results. A single-host TPU VM (e.g. v4-8,
# v5litepod-8) works the same way with one worker.
#
#   --setup      first clone/update the repository on every worker and pip install
#                requirements.txt plus jax[tpu] (REPO_URL, REPO_REF and REPO_DIR below)
#   --project=P  gcloud project (default: gcloud's configured one)
#
# The work directory is a local path (gs:// URLs are not supported). On a pod slice it
# must be the same shared directory on every worker (checkpoints are written by all
# processes together; stage checks read it): mount a bucket with gcsfuse, or a Filestore
# NFS share, at the same path on all workers, e.g.
#   gcloud compute tpus tpu-vm ssh TPU --zone=Z --worker=all \
#     --command="mkdir -p /mnt/runs && gcsfuse --implicit-dirs BUCKET /mnt/runs"
# On a single-host TPU VM any local directory works.
#
# Environment: REPO_URL (git URL of this repository), REPO_REF (branch/tag, default
# main), REPO_DIR (checkout directory on the workers, default ~/fp_jax), JAX_VERSION
# (default 0.10.2), DRY_RUN=1 (print the gcloud commands instead of running them).
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

[[ $# -ge 2 ]] || usage
TPU_NAME=$1; ZONE=$2; shift 2
PROJECT=""; SETUP=0
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --project=*) PROJECT=${1#--project=} ;;
    --setup) SETUP=1 ;;
    *) echo "error: unknown option $1 (options go before --)" >&2; exit 2 ;;
  esac
  shift
done
source "$(dirname "$0")/common.sh"
check_main_args "$@"
shift

REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-main}
REPO_DIR=${REPO_DIR:-'~/fp_jax'}
JAX_VERSION=${JAX_VERSION:-0.10.2}

gcloud_ssh() {
  local cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all)
  [[ -n $PROJECT ]] && cmd+=(--project="$PROJECT")
  cmd+=(--command="$1")
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
  else
    "${cmd[@]}"
  fi
}

if [[ $SETUP == 1 ]]; then
  [[ -n $REPO_URL ]] || { echo "error: --setup needs REPO_URL=<git URL of this repository>" >&2; exit 2; }
  gcloud_ssh "set -e; if [ -d $REPO_DIR/.git ]; then git -C $REPO_DIR fetch -q origin $REPO_REF && git -C $REPO_DIR checkout -q FETCH_HEAD; else git clone -q --branch $REPO_REF $REPO_URL $REPO_DIR; fi; cd $REPO_DIR && python3 -m pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION'"
fi

# The program's arguments, quoted for the remote shell.
ARGS=$(printf '%q ' "$@")
# Logs of every worker stream back through ssh; TensorFlow (datasets only) stays off the TPU.
gcloud_ssh "cd $REPO_DIR && TF_CPP_MIN_LOG_LEVEL=2 python3 -m fp_jax.main $ARGS --coordinator_address=auto"
