"""Commands that need no portal database: the cluster view, batch scripts, the image cache,
staging data in and out of jobs."""
from __future__ import annotations

import json
import logging
import os
import pwd
import shlex
import sys
from pathlib import Path

from portal.cli.client import CliError, _api, _command_of, _parse_env, _print_json, _when
from portal.cli.convert import cmd_image_convert  # noqa: F401 -- `aiportal image convert` lives there



def cmd_cluster(args) -> int:
    view = _api(args, "GET", "/cluster")
    if args.json:
        _print_json(view)
        return 0
    print("cluster %s: %d of %d GPUs in use" % (view["cluster"], view["gpus_used"], view["gpus"]))
    print("%-12s %-8s %-12s %s" % ("PARTITION", "GPUS", "MAXTIME", "NODES"))
    for p in view["partitions"]:
        print("%-12s %-8s %-12s %s" % (p["name"] + ("*" if p["default"] else ""),
                                       "%d/%d" % (p["gpus_used"], p["gpus"]), p["max_time"], ",".join(p["nodes"])))
    print()
    print("%-8s %-12s %-10s %-8s %s" % ("NODE", "PARTITIONS", "STATE", "GPUS", "REASON"))
    for n in view["nodes"]:
        state = n["state"] + ("" if n["responding"] else "*")
        print("%-8s %-12s %-10s %-8s %s" % (n["name"], ",".join(n["partitions"]), state,
                                            "%d/%d" % (n["gpus_used"], n["gpus"]), n["reason"]))
    return 0


def cmd_sessions(args) -> int:
    """The account's logged-in browsers; with --revoke, log out everywhere (every browser, this
    token is untouched)."""
    if args.revoke:
        ended = _api(args, "POST", "/sessions/revoke")["ended"]
        print("logged out everywhere: %d web session%s ended (API tokens are not touched: `aiportal token list`)"
              % (ended, "" if ended == 1 else "s"))
        return 0
    sessions = _api(args, "GET", "/sessions")["sessions"]
    if args.json:
        _print_json(sessions)
        return 0
    if not sessions:
        print("no browser is logged in to this account")
        return 0
    print("%-4s %-20s %-20s %-16s %s" % ("ID", "LOGGED IN", "LAST SEEN", "ADDRESS", "BROWSER"))
    for s in sessions:
        print("%-4d %-20s %-20s %-16s %s" % (s["id"], _when(s["created_at"]), _when(s["last_seen_at"]),
                                             s["address"], s["user_agent"][:60]))
    return 0


def _site_settings():
    from portal.settings import Settings
    return Settings.load(require_secrets=False)


def cmd_script(args) -> int:
    """The batch script for a job, to edit and submit with plain sbatch (as yourself)."""
    import storage
    from portal.errors import ValidationError
    from portal.models.common import parse
    from portal.models.jobs import JobCreate
    from portal.services.submit import Submission, job_dir_for, render_script
    from storage.errors import StorageError
    command = _command_of(args, "script")
    image = args.image
    if image.startswith("docker://"):
        image = _registry_image(args, image)
    elif not image.startswith("/") or not image.endswith(".sif"):
        image = _cached_image(args.image)
    try:
        job = parse(JobCreate, {"image": image, "node_type": args.node_type, "command": list(command),
                                "name": args.name, "inputs": list(args.input), "stage": args.stage,
                                "gpu_type": args.gpu_type,
                                "output": args.output,
                                "time_limit": args.time, "env": dict(_parse_env(args.env))})
        if any(storage.needs_credentials(u) for u in job.inputs + [job.output or ""] if u) \
                and not args.credentials:
            raise CliError("%s needs your data-source keys: write them to a file only you can read "
                           "(format: docs/storage.md) and pass --credentials FILE"
                           % next(u for u in job.inputs + [job.output or ""] if u and storage.needs_credentials(u)))
        sub = Submission(user=pwd.getpwuid(os.geteuid()).pw_name,     # the account that runs sbatch, not $USER
                         credentials=os.path.abspath(args.credentials) if args.credentials else None)
        settings = _site_settings()
        text = render_script(settings, job, sub, run_folders=True)
    except (ValidationError, StorageError) as e:
        raise CliError(str(e)) from e
    # Slurm opens the log before the script runs: its folder must exist (yours alone)
    folder = job_dir_for(settings, sub.user, sub.job_id)
    if os.geteuid() == 0:       # root's jobs are not the portal's: make nothing in the shared folders
        sys.stdout.write(text)
        print("# as root nothing was created: run `aiportal script` as the user who submits it, or create the log "
              "folder before sbatch: mkdir -p %s" % shlex.quote(str(folder / "logs")), file=sys.stderr)
        return 0
    try:
        (folder / "logs").mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
    except OSError as e:
        raise CliError("cannot create the job folder %s (%s); the script needs it before sbatch: create it with "
                       "`mkdir -p %s`" % (folder, e.strerror or e, shlex.quote(str(folder / "logs")))) from e
    sys.stdout.write(text)
    print("# job folder %s: each sbatch of this script runs in its own run-SLURM_JOB_ID folder in it, its log in "
          "logs/slurm-SLURM_JOB_ID.out; the portal lists it among your jobs" % folder, file=sys.stderr)
    return 0


def _registry_image(args, ref: str) -> str:
    """The cached SIF of a registry image, pinned and checked with your account by the portal
    (``GET /api/v1/images/check``): a script runs the digest the portal would run."""
    import urllib.parse
    ans = _api(args, "GET", "/images/check?ref=%s" % urllib.parse.quote(ref, safe=""))
    if not ans["ok"]:
        raise CliError("%s: %s" % (ref, ans["message"]))
    if not ans["cached"]:
        raise CliError("%s (%s) is not converted yet: submit a job with it once through the portal "
                       "(`aiportal submit --image %s ...`) or register it on the Images page, then run this again"
                       % (ref, ans["pinned"], ref))
    return ans["sif"]


def _cached_image(ref: str) -> str:
    from containers.cache import SifCache
    from containers.errors import ContainerError
    from containers.refs import parse_image_ref
    settings = _site_settings()
    try:
        parsed = parse_image_ref(ref)
        hit = SifCache(settings.image_cache).lookup(parsed)
    except ContainerError as e:
        raise CliError(str(e)) from e
    if hit is None:
        raise CliError("image %s is not converted yet; run `aiportal image convert %s` first" % (ref, ref))
    return str(hit)


def cmd_image_list(args) -> int:
    import datetime

    from containers.cache import SifCache
    settings = _site_settings()
    entries = SifCache(Path(args.cache or settings.image_cache)).entries()
    if args.json:
        json.dump([{"digest": e.digest, "path": str(e.path), "size_bytes": e.size_bytes,
                    "last_used": e.last_used, "refs": list(e.refs)} for e in entries], sys.stdout, indent=2)
        print()
        return 0
    print("%-20s %10s %-20s %s" % ("DIGEST", "SIZE", "LAST USED", "REFERENCES"))
    for e in entries:
        used = datetime.datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M") if e.last_used else "-"
        print("%-20s %9.1fM %-20s %s" % (e.digest[:19], e.size_bytes / 1e6, used, ", ".join(e.refs)))
    return 0


def cmd_stage(args) -> int:
    """``stage in --from URI --to DIR``; ``stage out --from DIR --to URI [--from DIR --to URI ...]``:
    each pair in turn (finishing a job's pending stage-outs: one per output folder); a pair that
    fails does not stop the others, and the command fails if any did."""
    from storage.errors import StorageError
    from storage.stage import stage_in, stage_out
    logging.basicConfig(level=logging.INFO, format="[aiportal stage] %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    kw = dict(credentials=args.credentials, workers=args.workers, bandwidth_mbps=args.bandwidth_mbps,
              progress_every=args.progress_every)
    if args.retries is not None:
        from storage.retry import RetryPolicy
        from storage.transfer import TransferOptions
        kw["options"] = TransferOptions(retry=RetryPolicy(attempts=max(1, args.retries)))
    if args.direction == "in":
        try:
            stats = stage_in(args.source, args.dest, missing_ok=args.missing_ok, **kw)
        except (StorageError, ValueError) as e:
            raise CliError("stage in: %s" % e) from e
        print("[aiportal stage] in %s -> %s: %s" % (args.source, args.dest, stats.summary()), file=sys.stderr)
        return 0
    sources = args.source if isinstance(args.source, list) else [args.source]
    dests = args.dest if isinstance(args.dest, list) else [args.dest]
    if len(sources) != len(dests):
        raise CliError("stage out: give one --to URI after each --from DIR (got %d --from, %d --to)"
                       % (len(sources), len(dests)))
    if args.pending_record and len(sources) > 1:
        raise CliError("stage out: --pending-record names the record of one folder; give one --from with it")
    failed = []
    for source, dest in zip(sources, dests):
        if len(sources) > 1:
            print("[aiportal stage] out %s -> %s: starting" % (source, dest), file=sys.stderr, flush=True)
        try:
            stats = stage_out(source, dest, pending_record=args.pending_record, **kw)
        except (StorageError, ValueError) as e:
            if len(sources) == 1:
                raise CliError("stage out: %s" % e) from e
            print("aiportal: stage out %s -> %s: %s" % (source, dest, e), file=sys.stderr, flush=True)
            failed.append(source)
            continue
        print("[aiportal stage] out %s -> %s: %s" % (source, dest, stats.summary()), file=sys.stderr, flush=True)
    if failed:
        raise CliError("stage out: %d of %d folders are still pending (%s); see the messages above"
                       % (len(failed), len(sources), ", ".join(failed)))
    return 0
