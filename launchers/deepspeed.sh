#!/usr/bin/env bash
# GRPO under the DeepSpeed launcher, on one node or on the nodes of a hostfile.
#
#   launchers/deepspeed.sh [hydra overrides...]                            # this node, all its GPUs
#   NUM_GPUS=4 launchers/deepspeed.sh trainer.steps=10                      # this node, GPUs 0-3
#   HOSTFILE=launchers/hostfile launchers/deepspeed.sh model=qwen2.5-7b ... # every node of the hostfile
#
# The launcher only starts the processes (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT);
# the parallel layout is the backend's: backend=torch runs DDP, a DeepSpeed backend runs ZeRO.
#
# Environment knobs:
#   VENV         python environment (default .venv); on every node at the same path for multi node
#   HOSTFILE     DeepSpeed hostfile ("HOST slots=N" lines, see launchers/hostfile); unset = this node only
#   NUM_NODES    use the first N hosts of the hostfile (default: all)
#   NUM_GPUS     GPUs per node (default: all of them / the hostfile's slots)
#   MASTER_ADDR  address of the first host as the others reach it (default: DeepSpeed asks that host)
#   MASTER_PORT  rendezvous port (default 29500)
#   DS_LAUNCHER  pdsh (default: ssh fan-out from this node), openmpi, mvapich, slurm, ...
# Multi node needs passwordless ssh (pdsh) from this node to every host, this repository and VENV at
# the same path everywhere, and the same working folder. DeepSpeed exports variables whose names
# start with NCCL, PYTHON, MLFLOW or UCX to the other nodes; put anything else (FASTGRPO_PG_TIMEOUT_S,
# OMP_NUM_THREADS, ...) as VAR=value lines in ./.deepspeed_env or ~/.deepspeed_env.
# Preemption: on SIGTERM the launcher gives the training processes 30 s before SIGKILL; for a
# graceful stop (finish the step, checkpoint, exit 0) send SIGUSR1 to the training processes
# themselves, then rerun this script with checkpoint.resume=auto (see launchers/README.md).
set -euo pipefail

VENV="${VENV:-.venv}"
DEEPSPEED="${VENV}/bin/deepspeed"
PYTHON="${VENV}/bin/python"

args=(--module --no_local_rank --master_port "${MASTER_PORT:-29500}")
# --no_local_rank: the launcher would append --local_rank=N to the arguments, which Hydra rejects;
# the processes read LOCAL_RANK from the environment instead.
if [[ -n "${HOSTFILE:-}" ]]; then
    # Fail here, naming the bad line, rather than in DeepSpeed's runner.
    "$PYTHON" -m fastgrpo.launch check-hostfile "$HOSTFILE"
    args+=(--hostfile "$HOSTFILE" --launcher "${DS_LAUNCHER:-pdsh}")
    if [[ -n "${NUM_NODES:-}" ]]; then args+=(--num_nodes "$NUM_NODES"); fi
    if [[ -n "${MASTER_ADDR:-}" ]]; then args+=(--master_addr "$MASTER_ADDR"); fi
else
    # No hostfile: DeepSpeed would still read /job/hostfile if one exists; a missing path keeps this
    # run on the local node.
    args+=(--hostfile /nonexistent/fastgrpo-single-node)
fi
if [[ -n "${NUM_GPUS:-}" ]]; then args+=(--num_gpus "$NUM_GPUS"); fi

exec "$DEEPSPEED" "${args[@]}" fastgrpo.cli.train "$@"
