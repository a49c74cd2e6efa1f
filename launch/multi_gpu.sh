#!/usr/bin/env bash
# Runs fp_jax on the GPUs of one node (or of several nodes).
#
#   launch/multi_gpu.sh [OPTIONS] -- --config=configs/cifar.py --workdir=runs/cifar [...]
#
# Default: ONE process that drives every visible GPU (JAX sees all local GPUs and the
# data-parallel mesh spans them; pick GPUs with CUDA_VISIBLE_DEVICES). This is the
# simplest and usually the fastest set-up on a single node.
#
# Options (the multi-process variants, via jax.distributed):
#   --procs_per_node=P   P processes on this node, each with its own share of the GPUs
#                        (CUDA_VISIBLE_DEVICES split evenly; P must divide the GPU count)
#   --nodes=N            total nodes (default 1); run this script once per node
#   --node_rank=R        this node's index in [0, N) (default 0)
#   --coordinator=H:PORT process 0's host and a free port; required when N > 1, default
#                        127.0.0.1:<free port> on one node
#   --gpus=LIST          comma-separated GPU ids to use (default: CUDA_VISIBLE_DEVICES, else
#                        every GPU nvidia-smi lists)
#
# Process ids are R * P + i; every process loads its own rows of each global batch and
# process 0 writes the results, so on several nodes --workdir must be a shared directory.
# Output lines are prefixed with the process id. If a process fails, the others on this
# node are stopped and the script exits with its status. On SLURM use instead
#   srun --nodes=N --ntasks-per-node=P python -m fp_jax.main ... --coordinator_address=auto
# (jax.distributed reads the SLURM environment and gives each task one GPU).
set -euo pipefail

PROCS=1; NODES=1; RANK=0; COORD=""; GPUS=""
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --procs_per_node=*) PROCS=${1#*=} ;;
    --nodes=*) NODES=${1#*=} ;;
    --node_rank=*) RANK=${1#*=} ;;
    --coordinator=*) COORD=${1#*=} ;;
    --gpus=*) GPUS=${1#*=} ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option $1 (options go before --)" >&2; exit 2 ;;
  esac
  shift
done
source "$(dirname "$0")/common.sh"
check_main_args "$@"
shift
for v in PROCS NODES; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "error: --$( [[ $v == PROCS ]] && echo procs_per_node || echo nodes)=${!v}: must be an integer >= 1" >&2; exit 2; }
done
[[ $RANK =~ ^[0-9]+$ && $RANK -lt $NODES ]] || { echo "error: --node_rank=$RANK: must be in [0, $NODES)" >&2; exit 2; }

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
PY=${PYTHON:-python3}

TOTAL=$((NODES * PROCS))
if [[ $TOTAL == 1 ]]; then   # one process, all GPUs
  [[ -n $GPUS ]] && export CUDA_VISIBLE_DEVICES=$GPUS
  exec "$PY" -m fp_jax.main "$@"
fi

if [[ -z $GPUS ]]; then
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    GPUS=$CUDA_VISIBLE_DEVICES
  else
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ $n -gt 0 ]] || { echo "error: no GPUs found (nvidia-smi -L); pass --gpus=0,1,..." >&2; exit 2; }
    GPUS=$(seq -s, 0 $((n - 1)))
  fi
fi
IFS=, read -r -a GPU_LIST <<< "$GPUS"
NGPU=${#GPU_LIST[@]}
if (( NGPU % PROCS )); then
  echo "error: --procs_per_node=$PROCS must divide the $NGPU GPUs ($GPUS)" >&2; exit 2
fi
PER=$((NGPU / PROCS))

if [[ -z $COORD ]]; then
  [[ $NODES == 1 ]] || { echo "error: --nodes=$NODES needs --coordinator=HOST:PORT (node 0's address)" >&2; exit 2; }
  COORD="127.0.0.1:$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap 'cleanup; exit 130' INT TERM
for ((i = 0; i < PROCS; i++)); do
  id=$((RANK * PROCS + i))
  devs=$(IFS=,; echo "${GPU_LIST[*]:$((i * PER)):$PER}")
  CUDA_VISIBLE_DEVICES=$devs "$PY" -m fp_jax.main "$@" --coordinator_address="$COORD" \
    --num_processes="$TOTAL" --process_id="$id" \
    > >(sed -u "s/^/[$id] /") 2> >(sed -u "s/^/[$id] /" >&2) &
  pids+=($!)
done

status=0
live=("${!pids[@]}")   # indices of the processes still running
while [[ ${#live[@]} -gt 0 ]]; do
  sleep 0.5
  rest=()
  for i in "${live[@]}"; do
    if kill -0 "${pids[i]}" 2>/dev/null; then rest+=("$i"); continue; fi
    set +e; wait "${pids[i]}"; rc=$?; set -e
    if [[ $rc != 0 && $status == 0 ]]; then
      status=$rc
      echo "error: process $((RANK * PROCS + i)) exited with status $rc; stopping the others on this node" >&2
      cleanup
    fi
  done
  live=("${rest[@]}")
done
exit "$status"
