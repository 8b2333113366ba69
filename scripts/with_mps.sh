#!/usr/bin/env bash
# Run one command with a CUDA MPS control daemon of its own (issue 5: do processes that share one GPU
# gain when MPS lets their kernels run side by side instead of time-slicing?).
#
#   PYTHONPATH=. bash scripts/with_mps.sh python3 scripts/gpu_procs.py CORPUS_DIR --sets "decode+model,decode+model"
#
# The daemon's pipe and log folders are fresh temporary folders, so it serves this command's
# processes only; it is told to quit when the command ends, however it ends, and its log is printed.
# MPS needs no change to the GPU's settings (compute mode stays as it is).
set -euo pipefail
export CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
CUDA_MPS_PIPE_DIRECTORY=$(mktemp -d)
CUDA_MPS_LOG_DIRECTORY=$(mktemp -d)
stop_daemon() {
    echo "MPS servers: $(echo get_server_list | nvidia-cuda-mps-control | tr '\n' ' ')"
    echo quit | nvidia-cuda-mps-control
    sleep 1
    tail -n 3 "$CUDA_MPS_LOG_DIRECTORY/control.log"
}
nvidia-cuda-mps-control -d
trap stop_daemon EXIT
"$@"
