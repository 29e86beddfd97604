#!/bin/bash
# make-fake-gpus.sh DIR NODE:COUNT... -- character devices DIR/NODE/nvidia0..COUNT-1 with the
# NVIDIA major number (195). Slurm only sets CUDA_VISIBLE_DEVICES for File= entries that are
# character devices; a regular file registers but yields an empty CUDA_VISIBLE_DEVICES.
set -euo pipefail
dir=$1; shift
for spec in "$@"; do
  node=${spec%%:*} count=${spec##*:}
  mkdir -p "$dir/$node"
  for ((i = 0; i < count; i++)); do
    dev=$dir/$node/nvidia$i
    if [ ! -c "$dev" ]; then
      rm -f "$dev"
      mknod -m 0666 "$dev" c 195 "$i"
      echo "created $dev"
    fi
  done
done
