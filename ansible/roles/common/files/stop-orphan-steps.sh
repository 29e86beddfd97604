#!/bin/bash
# A slurmd killed with SIGKILL (fault injection) leaves its slurmstepd and the job running,
# re-parented to init. After every slurmd of the dev cluster is stopped, such steps have no
# daemon to report to: stop them and their process groups.
set -u
for d in /proc/[0-9]*; do
  pid=${d#/proc/}
  [ "$(readlink "$d/exe" 2>/dev/null)" = /usr/sbin/slurmstepd ] || continue
  [ "$(awk '{print $4}' "$d/stat" 2>/dev/null)" = 1 ] || continue
  kids=$(cat /proc/"$pid"/task/*/children 2>/dev/null | tr '\n' ' ')
  kill -KILL "$pid" $kids 2>/dev/null && echo "killed slurmstepd $pid (children: ${kids:-none})"
done
exit 0
