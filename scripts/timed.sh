#!/bin/bash
# timed.sh LABEL CMD... - run CMD, then print how long it took (for the set-up timings in the README).
label=$1; shift
start=$EPOCHREALTIME
"$@"; rc=$?
awk -v a="$start" -v b="$EPOCHREALTIME" -v l="$label" -v rc="$rc" 'BEGIN { printf "[%s] %.1f s (exit %d)\n", l, b - a, rc }'
exit $rc
