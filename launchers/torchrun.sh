#!/usr/bin/env bash
# Single-node data parallel GRPO with the torch backend (DDP).
#   launchers/torchrun.sh NPROC [hydra overrides...]
# CPU: gloo; CUDA: nccl (backend.ddp_backend=auto picks).
set -euo pipefail
NPROC=${1:-2}; shift || true
exec "${VENV:-.venv}/bin/torchrun" --standalone --nproc_per_node "$NPROC" -m fastgrpo.cli.train "$@"
