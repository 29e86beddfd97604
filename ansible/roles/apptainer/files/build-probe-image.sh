#!/bin/bash
# build-probe-image.sh OUT.sif -- the tiny SIF the health check runs (`apptainer exec OUT.sif
# /bin/true`): a static busybox with sh and true, built from a sandbox folder (no network).
set -euo pipefail
out=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/root/bin" "$(dirname "$out")"
cp /bin/busybox "$tmp/root/bin/busybox"
for app in sh true; do ln -s busybox "$tmp/root/bin/$app"; done
apptainer --silent build --force "$tmp/probe.sif" "$tmp/root/"
chmod 0644 "$tmp/probe.sif"
mv "$tmp/probe.sif" "$out"
echo "built $out"
