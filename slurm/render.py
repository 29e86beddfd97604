"""Render a :class:`JobSpec` into the text of a batch script: a pure function.

This module is the one place in aiportal that turns values into shell text: every value goes
through :func:`shlex.quote` (``#SBATCH`` lines too; sbatch strips the quotes), so nothing a
user typed can run. The script:

1. ``#SBATCH`` header: partition, GRES, CPUs, memory, time, log file, requeue, checkpoint signal,
   the portal's job id in ``--comment``;
2. stage in: inputs to ``$AIPORTAL_JOB_DIR/data``, previous outputs/checkpoints back into the
   output dir (so a requeued job resumes);
3. run: ``spec.container`` (the apptainer argv ``containers.apptainer`` built, which binds
   data/ at /data/data and output/ at /data/output), the image and the command, in the
   background, forwarding the checkpoint signal and SIGTERM to it;
4. stage out, on success, failure and after SIGTERM; the script exits with the command's code.

A job Slurm may requeue is **fenced** (:func:`_fence`): each run is ``SLURM_JOB_ID:RESTARTS``
and writes that into the job folder's fence file before it touches anything; a run whose
fence file names another run is stale (its node lost contact and Slurm started the job again
elsewhere): a watchdog stops its command within seconds (TERM, then KILL for what is left after
3 s) and it exits without another log line, without staging out and without touching the credentials. A new run waits (up to
:data:`FENCE_WAIT_S`) for the run before it to say it has stopped; if it never does (its node is
gone, or cut off), the old output folder is set aside as ``output.run-ID:N`` and the new run goes
on from a copy of it, so the two never write the same folder (docs/execution.md).
"""
from __future__ import annotations

import shlex

from slurm.errors import SpecError
from slurm.spec import SCRIPT_DIRS, JobSpec, ScriptDir, check_job_basics, warning_fits

COMMENT_PREFIX = "aiportal:"
EXIT_STAGE_IN_FAILED = 90
EXIT_STAGE_OUT_FAILED = 91
#: a run that stopped because a newer run of the same job started (it was requeued elsewhere)
EXIT_SUPERSEDED = 92
#: how long a requeued run waits for the run before it to stop before it goes on without it
FENCE_WAIT_S = 15


def sbatch_flag(name: str, value: str | int | None = None) -> str:
    """One ``#SBATCH`` line; the value is shell-quoted (sbatch removes the quotes)."""
    if value is None:
        return "#SBATCH --%s" % name
    return "#SBATCH --%s=%s" % (name, shlex.quote(str(value)))


def sbatch_header(spec: JobSpec) -> list[str]:
    """The ``#SBATCH`` lines of a spec, in a fixed order (golden files depend on it)."""
    log_name = "slurm-%A_%a.out" if spec.array else "slurm-%j.out"
    lines = [
        sbatch_flag("job-name", spec.name),
        sbatch_flag("partition", spec.partition),
        sbatch_flag("ntasks", 1),
        sbatch_flag("cpus-per-task", spec.cpus),
    ]
    if spec.gpus:
        gres = "gpu:%s:%d" % (spec.gpu_type, spec.gpus) if spec.gpu_type else "gpu:%d" % spec.gpus
        lines.append(sbatch_flag("gres", gres))
    if spec.memory_mb is not None:
        lines.append(sbatch_flag("mem", "%dM" % spec.memory_mb))
    lines += [
        sbatch_flag("time", spec.time_limit),
        sbatch_flag("chdir", spec.job_dir),
        sbatch_flag("output", "%s/logs/%s" % (spec.job_dir, log_name)),
        sbatch_flag("open-mode", "append"),
        sbatch_flag("requeue" if spec.requeue else "no-requeue"),
    ]
    if spec.checkpoint_signal and warning_fits(spec.checkpoint_signal, spec.time_limit):
        lines.append(sbatch_flag("signal", spec.checkpoint_signal))
    if spec.portal_id:
        lines.append(sbatch_flag("comment", COMMENT_PREFIX + spec.portal_id))
    for opt in ("account", "qos", "constraint", "reservation", "dependency", "array"):
        value = getattr(spec, opt)
        if value is not None:
            lines.append(sbatch_flag(opt, value))
    return lines


def shell_word(word: str | tuple[str | ScriptDir, ...]) -> str:
    """One argv word as shell text: a string quoted; a tuple's parts joined, each string
    quoted and each :class:`ScriptDir` as ``"$<var>"`` (the script defines those variables
    before it runs the container). The one place run-time values enter a command line."""
    if isinstance(word, str):
        return shlex.quote(word)
    out = []
    for part in word:
        if isinstance(part, ScriptDir):
            if part not in SCRIPT_DIRS:
                raise SpecError("container", word, "the script does not define $%s" % part.var)
            out.append('"$%s"' % part.var)
        else:
            out.append(shlex.quote(part))
    return "".join(out)


def _sweep_case(spec: JobSpec) -> list[str]:
    """Each array task exports its own parameters and its index in the whole sweep
    (``AIPORTAL_SWEEP_INDEX`` = task id + ``array_offset``, unique across split arrays)."""
    if not spec.sweep:
        return []
    out = ['case "${SLURM_ARRAY_TASK_ID:-}" in']
    for i, task in enumerate(spec.sweep):
        exports = ["export AIPORTAL_SWEEP_INDEX=%d" % (i + spec.array_offset)]
        exports += ["export %s=%s" % (k, shlex.quote(v)) for k, v in task]
        out.append("  %d) %s ;;" % (i, "; ".join(exports)))
    out += ['  *) log "no sweep parameters for array task ${SLURM_ARRAY_TASK_ID:-?}"; exit 2 ;;', "esac"]
    return out


def fence_done(job_dir: str, slurm_id: str, run: int | None = None) -> tuple[int, bool, float] | None:
    """How the last run of Slurm job ``slurm_id`` that ran in ``job_dir`` ended (``run``: that
    run, by Slurm's restart count), by its own fence record: (exit status, stopped by a signal,
    when: the record's mtime), or None when none ended there (a job array's tasks have records
    of their own: None)."""
    import glob
    import os
    best: tuple[int, str] | None = None
    for path in glob.glob(os.path.join(glob.escape(job_dir), ".aiportal-run.%s:*.done" % slurm_id)):
        n = path.rsplit(":", 1)[1][:-len(".done")]
        if n.isdigit() and (run is None or int(n) == run) and (best is None or int(n) > best[0]):
            best = (int(n), path)
    if best is None:
        return None
    try:
        with open(best[1]) as fh:
            words = fh.read().split()
            when = os.fstat(fh.fileno()).st_mtime
        return int(words[0]), words[1:2] == ["1"], when
    except (OSError, ValueError, IndexError):
        return None


def _fence() -> list[str]:
    """The fence of a job Slurm may requeue (see the module's docstring): shell text with no
    value from the spec in it."""
    return [
        "# fence: this run is SLURM_JOB_ID:RESTARTS; a run the fence file does not name is stale",
        'run_id="${SLURM_JOB_ID:-0}:${SLURM_RESTART_COUNT:-0}"',
        "# a sweep's task by its index in the whole sweep: a sweep split into several arrays repeats task ids",
        'task_key="${AIPORTAL_SWEEP_INDEX:-${SLURM_ARRAY_TASK_ID:-}}"',
        'fence="$AIPORTAL_JOB_DIR/.aiportal-run${task_key:+-task$task_key}"',
        'fenced() { local r=""; read -r r _ < "$fence" 2>/dev/null; printf %s "$r"; }',
        'done_file() { printf %s "$fence.$1.done"; }',
        "superseded=0 watchdog=0",
        'prev="$(fenced)"',
        "# one instance per run: a controller restarted from older state starts a run again that ran (or",
        "# still runs) elsewhere; the second instance waits for the first and ends as it did",
        'if ! mkdir "$fence.$run_id.lock" 2>/dev/null; then',
        '  log "run $run_id started before (Slurm started it again after a controller restart): waiting for it"',
        '  for _ in $(seq "${AIPORTAL_FENCE_WAIT_S:-%d}"); do [ -e "$(done_file "$run_id")" ] && break; sleep 1; done'
        % FENCE_WAIT_S,
        '  st=0 stp=1',
        '  [ ! -e "$(done_file "$run_id")" ] || read -r st stp _ < "$(done_file "$run_id")"',
        '  if [ "${stp:-0}" != 1 ]; then log "run $run_id ended with status $st: not running it twice"; '
        'exit "$st"; fi',
        '  log "run $run_id was stopped, or did not answer: this instance goes on"',
        "fi",
        "# a run of this job that completed on its own is final: Slurm starting the job again after a",
        "# controller restart (as a requeue) does not run it twice; to run it again, submit it again",
        'if [ -n "$prev" ] && [ "${prev%%:*}" = "${run_id%%:*}" ] && [ "${prev##*:}" -lt "${run_id##*:}" ] '
        '&& [ "$(cat "$(done_file "$prev")" 2>/dev/null)" = "0 0" ]; then',
        '  log "run $prev of this job completed; Slurm started it again as $run_id: not running it twice"',
        "  exit 0",
        "fi",
        'if [ -n "$prev" ] && [ "${prev%%:*}" = "${run_id%%:*}" ] && [ "${prev##*:}" -gt "${run_id##*:}" ]; then',
        '  exit %d   # a newer run of this job has started already' % EXIT_SUPERSEDED,
        "fi",
        'printf "%%s %%s\\n" "$run_id" "$(hostname)" > "$fence.$$" && mv -f "$fence.$$" "$fence" || '
        '{ log "cannot write the fence file $fence"; exit %d; }' % EXIT_STAGE_IN_FAILED,
        "# where one run's lines end and the next's begin (runs share the job's log, one at a time)",
        'log "run $run_id on $(hostname)${prev:+ (the run before: $prev)}"',
        "# every end of this run says so, with its exit status and whether a signal stopped it (the next run",
        "# waits for that; the portal reads it for a run Slurm forgot), and ends the watchdog",
        "trap 'st=$?; if [ \"$watchdog\" -gt 0 ]; then kill \"$watchdog\" 2>/dev/null; fi; "
        "printf \"%s %s\\n\" \"$st\" \"${stopped:-0}\" > \"$(done_file \"$run_id\")\"' EXIT",
        'if [ -n "$prev" ] && [ "$prev" != "$run_id" ] && [ ! -e "$(done_file "$prev")" ]; then',
        '  wait_s="${AIPORTAL_FENCE_WAIT_S:-%d}"' % FENCE_WAIT_S,
        '  log "run $run_id: waiting up to $wait_s s for the previous run ($prev) to stop"',
        '  for _ in $(seq "$wait_s"); do [ -e "$(done_file "$prev")" ] && break; sleep 1; done',
        '  if [ -e "$(done_file "$prev")" ]; then',
        '    log "the previous run ($prev) has stopped"',
        "  else",
        '    log "the previous run ($prev) did not answer (its node is gone or cut off): its output folder is '
        'kept as $out_dir.run-$prev; this run goes on from a copy of it"',
        '    mv "$out_dir" "$out_dir.run-$prev" && cp -a --reflink=auto "$out_dir.run-$prev" "$out_dir" || '
        '{ log "cannot set the previous output folder aside"; exit %d; }' % EXIT_STAGE_IN_FAILED,
        "  fi",
        "fi",
        "# the watchdog: when another run takes the fence, stop the command and all it started at once (by",
        "# parentage: a process group of its own would take apptainer's FUSE helpers out of Slurm's reach)",
        'kill_tree() { local c; kill -STOP "$1" 2>/dev/null; for c in $(pgrep -P "$1"); do kill_tree "$c"; done; '
        'kill -KILL "$1" 2>/dev/null; }',
        "# TERM first: apptainer unmounts the image and ends its FUSE helper (a KILL would leave that running)",
        'stop_stale() { superseded=1; if [ "$child" -gt 0 ]; then kill -TERM "$child" 2>/dev/null; '
        'for _ in $(seq 30); do kill -0 "$child" 2>/dev/null || break; sleep 0.1; done; kill_tree "$child"; fi; }',
        "trap stop_stale USR2",
        '( while sleep 1; do r="$(fenced)"; if [ -n "$r" ] && [ "$r" != "$run_id" ]; then kill -USR2 $$; exit 0; fi; '
        'kill -0 $$ 2>/dev/null || exit 0; done ) &',
        "watchdog=$!",
        "# a stale run writes nothing more: no log line, no stage-out, its credentials untouched",
        'superseded_exit() { if [ "$superseded" = 1 ]; then exec >/dev/null 2>&1; exit %d; fi; }' % EXIT_SUPERSEDED,
    ]


def render_sbatch(spec: JobSpec) -> str:
    """The batch script for ``spec``, ready for ``sbatch`` on stdin.

    ``job_dir`` and ``job_dir/logs`` must exist and be writable by the job's user before
    submission (Slurm opens the log file before the script runs).
    """
    q = shlex.quote
    stage = q(spec.stage_bin)
    creds = (' --credentials "$AIPORTAL_JOB_DIR"/%s' % q(spec.credentials_file)) if spec.credentials_file else ""
    if spec.user_credentials:
        creds = " --credentials %s" % q(spec.user_credentials)
    lines = ["#!/bin/bash"] + sbatch_header(spec) + [
        "# Rendered by aiportal%s. Runs the command in its image with /data/data and /data/output"
        % (" for job " + spec.portal_id if spec.portal_id else ""),
        "# bound; stages data in before and out after (also on failure and on SIGTERM).",
        "set -uo pipefail",
        "log() { printf '[aiportal %(%Y-%m-%dT%H:%M:%S)T] %s\\n' -1 \"$*\" >&2; }",
        "export AIPORTAL_JOB_DIR=%s" % q(spec.job_dir) + ('/run-"${SLURM_JOB_ID:-0}"' if spec.run_folders else ""),
    ]
    if spec.portal_id:
        lines.append("export AIPORTAL_JOB_ID=%s" % q(spec.portal_id))
    lines += ["export %s=%s" % (k, q(v)) for k, v in spec.env]
    lines += _sweep_case(spec)
    lines += [
        'data_dir="$AIPORTAL_JOB_DIR/data"',
        'out_dir="$AIPORTAL_JOB_DIR/output"',
        "out_uri=%s" % q(spec.output or ""),
    ]
    if spec.array:
        lines += ['task="${AIPORTAL_SWEEP_INDEX:-${SLURM_ARRAY_TASK_ID:-0}}"',
                  'out_dir="$out_dir/task-$task"',
                  '[ -z "$out_uri" ] || out_uri="$out_uri/task-$task"']
    lines += [
        'mkdir -p "$data_dir" "$out_dir" || { log "cannot create $data_dir and $out_dir"; exit %d; }' % EXIT_STAGE_IN_FAILED,
        "",
        "child=0",
        'forward() { if [ "$child" -gt 0 ]; then kill -s "$1" "$child" 2>/dev/null || true; fi; }',
        "trap 'log \"got USR1: passing it on so the program can checkpoint\"; forward USR1' USR1",
        "trap 'log \"got TERM: stopping the program, then staging out\"; stopped=1; forward TERM' TERM INT",
    ]
    if spec.requeue:
        lines += _fence()
    lines.append("")
    if spec.requeue and (spec.inputs or spec.output):
        lines.append("superseded_exit")
    for uri in spec.inputs:
        lines += ['log %s' % q("stage in: %s -> data/" % uri),
                  '%s stage in --from %s --to "$data_dir"%s || { log "stage in failed"; exit %d; }'
                  % (stage, q(uri), creds, EXIT_STAGE_IN_FAILED)]
    for src, dst in spec.bound_inputs:
        lines.append("log %s" % q("input: %s bound read-only at %s" % (src, dst)))
    if spec.output:
        lines += ['log "restore previous outputs: $out_uri -> output/"',
                  '%s stage in --from "$out_uri" --to "$out_dir" --missing-ok%s || { log "restoring outputs failed"; exit %d; }'
                  % (stage, creds, EXIT_STAGE_IN_FAILED)]
    lines += [
        "",
    ]
    if spec.requeue:
        lines.append("superseded_exit")
    lines += [
        "log %s" % q("run: %s" % shlex.join(spec.command)),
        "%s &" % " ".join(shell_word(w) for w in spec.container + (spec.image,) + spec.command),
        "child=$!",
        "# wait returns early when a trapped signal arrives; keep waiting for the program itself",
        'while kill -0 "$child" 2>/dev/null; do wait "$child"; done',
        'wait "$child"; rc=$?',
    ]
    if spec.requeue:
        lines.append("superseded_exit")
    lines += [
        'log "command exited with $rc"',
    ]
    if spec.output:
        lines += [
            'log "stage out: output/ -> $out_uri"',
            '%s stage out --from "$out_dir" --to "$out_uri"%s || { log "stage out failed; outputs are kept in $out_dir"; staged_out=0; [ "$rc" -ne 0 ] || rc=%d; }'
            % (stage, creds, EXIT_STAGE_OUT_FAILED),
        ]
    if spec.credentials_file:
        # the job is over: its keys go, unless a stage-out is still pending (finishing it needs them)
        # or the job was stopped by a signal: a requeue or a preemption sends TERM and the next run
        # stages in with them (the portal removes them once the job is over for good); a job that
        # dies with its node never gets here and finds them again when requeued
        lines.append('[ "${staged_out:-1}" = 0 ] || [ "${stopped:-0}" = 1 ] || rm -f "$AIPORTAL_JOB_DIR"/%s'
                     % q(spec.credentials_file))
    lines.append('exit "$rc"')
    return "\n".join(lines) + "\n"


def render_command_job(name: str, partition: str, argv: list[str], log_path: str, cpus: int = 1,
                       time_limit: str = "01:00:00", comment: str | None = None) -> str:
    """A batch script that runs one host command (no container, no staging): image
    conversions and other service work. Same quoting rules as :func:`render_sbatch`."""
    if isinstance(argv, (str, bytes)):
        raise SpecError("command", argv, "give the command as a list of arguments, not one string")
    argv = list(argv)
    check_job_basics(name, partition, argv, time_limit)
    if not isinstance(cpus, int) or cpus < 1:
        raise SpecError("resources", cpus, "need cpus >= 1")
    if not log_path.startswith("/") or "\n" in log_path or "\0" in log_path:
        raise SpecError("log_path", log_path, "must be an absolute path without newlines")
    lines = ["#!/bin/bash",
             sbatch_flag("job-name", name),
             sbatch_flag("partition", partition),
             sbatch_flag("ntasks", 1),
             sbatch_flag("cpus-per-task", cpus),
             sbatch_flag("time", time_limit),
             sbatch_flag("output", log_path),
             sbatch_flag("open-mode", "append")]
    if comment:
        lines.append(sbatch_flag("comment", comment))
    lines += ["set -euo pipefail", "exec %s" % shlex.join(argv)]
    return "\n".join(lines) + "\n"
