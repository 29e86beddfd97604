#!/bin/bash
# provision.sh [RUNS] - warm provisioning time of the dev cluster vs. a no-op playbook.
# Needs `make run` first. Prints seconds per run and the ratio to the no-op baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
export ANSIBLE_CONFIG=$PWD/ansible/ansible.cfg
pb=.venv/bin/ansible-playbook
noop=$(mktemp --suffix=.yml)
trap 'rm -f "$noop"' EXIT
printf -- '- hosts: all\n  gather_facts: false\n  tasks:\n    - ansible.builtin.meta: noop\n' > "$noop"
t() { local s=$EPOCHREALTIME; "$@" > /dev/null; awk -v a="$s" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}'; }
for i in $(seq "$runs"); do
  base=$(t $pb -i ansible/inventories/dev "$noop")
  full=$(t $pb -i ansible/inventories/dev ansible/site.yml)
  awk -v b="$base" -v f="$full" -v i="$i" 'BEGIN{printf "run %d: site.yml %.1f s, no-op playbook %.1f s, ratio %.1fx\n", i, f, b, f/b}'
done
