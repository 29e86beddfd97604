"""Jobs over the API: submit, list, show, logs, cancel."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import urllib.error
import urllib.parse
import urllib.request

from portal.cli.client import (CliError, _api, _command_of, _parse_env, _print_json, _when, create, follow_log,
                               print_log)



# -- jobs over the API --------------------------------------------------------------------------

def _jpath(job_id: str, rest: str = "") -> str:
    return "/jobs/%s%s" % (urllib.parse.quote(job_id, safe=""), rest)


def _list_jobs(args, states=(), limit: int = 50, all_pages: bool = False) -> dict:
    """GET /jobs, one page or (``all_pages``) every page merged into one answer."""
    page = min(limit, 500) if not all_pages else 500
    jobs: list[dict] = []
    offset, total = 0, 0
    while True:
        query = [("limit", str(page)), ("offset", str(offset))] + [("state", s) for s in states]
        ans = _api(args, "GET", "/jobs?" + urllib.parse.urlencode(query))
        jobs += ans["jobs"]
        total = ans["total"]
        offset += len(ans["jobs"])
        if not all_pages or not ans["jobs"] or offset >= total:
            return {"total": total, "limit": len(jobs) if all_pages else ans["limit"], "offset": 0, "jobs": jobs}


def _resolve_job(args, ref: str) -> str:
    """A full job id from a full id, a unique prefix (what `jobs` shows) or a Slurm job id."""
    ref = ref.strip()
    if len(ref) == 36 or not ref:
        return ref
    jobs = _list_jobs(args, all_pages=True)["jobs"]
    hits = [j["id"] for j in jobs if j["id"].startswith(ref)]
    if not hits and ref.isdigit():
        hits = [j["id"] for j in jobs if j.get("slurm_job_id") == ref]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise CliError("no job of yours has an id starting with %r (or Slurm job id %s); see `aiportal jobs`"
                       % (ref, ref))
    raise CliError("%r matches %d jobs (%s); give more of the id"
                   % (ref, len(hits), ", ".join(h[:13] for h in hits[:5])))


def _job_sweep(items: list[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise CliError("--sweep %r: write it as NAME=V1,V2,..." % item)
        grid[key.strip()] = vals
    return grid


def _exit_status(job: dict) -> int:
    """The shell exit status for a finished job: 0 when it completed, else its exit code (1
    when it has none, e.g. cancelled or timed out)."""
    from slurm.states import JobState
    if JobState(job["state"]) is JobState.COMPLETED:
        return 0
    return job.get("exit_code") or 1


def _follow_to_end(args, job_id: str, offset: int = 0, task: str | None = None) -> dict:
    """Follow the log until the job has ended; the job as the API has it then."""
    follow_log(args, job_id, offset, task)
    job = _api(args, "GET", _jpath(job_id))
    code = "" if job.get("exit_code") is None else ", exit code %d" % job["exit_code"]
    print("aiportal: job %s ended: %s%s%s" % (job_id, job["state"], code,
                                            (" (%s)" % (job.get("reason_text") or job["reason"])) if job.get("reason") else ""), file=sys.stderr)
    return job


def cmd_submit(args) -> int:
    image = args.image
    if ":" not in image and not image.startswith("/") and os.path.exists(image):
        image = os.path.abspath(image)      # the portal resolves paths on its host, not in our cwd
    body = {"image": image, "node_type": args.node_type, "command": _command_of(args, "submit"),
            "name": args.name, "inputs": list(args.input), "stage": args.stage, "output": args.output,
            "gpu_type": args.gpu_type,
            "time_limit": args.time,
            "env": dict(_parse_env(args.env)), "gpus": args.gpus, "sweep": _job_sweep(args.sweep),
            "project": args.project}
    job = create(args, "/jobs", body, "job")
    if args.json:
        _print_json(job)
    elif not args.follow:
        print(job["id"])
    if args.follow:
        print("aiportal: submitted job %s (Slurm job %s); following its log" % (job["id"], job["slurm_job_id"]),
              file=sys.stderr)
        return _exit_status(_follow_to_end(args, job["id"]))
    return 0


def cmd_jobs(args) -> int:
    ans = _list_jobs(args, [s.upper() for s in args.state], args.limit, args.all_pages)
    if args.json:
        _print_json(ans)
        return 0
    print("%-8s %-20s %-11s %-8s %-12s %-19s %s" % ("ID", "NAME", "STATE", "SLURM", "NODES", "CREATED", "WHY"))
    for j in ans["jobs"]:
        why = j.get("reason_text", "") if j["state"] not in ("RUNNING", "COMPLETED") else ""
        print("%-8s %-20s %-11s %-8s %-12s %-19s %s" % (j["id"][:8], j["name"][:20], j["state"], j["slurm_job_id"] or "-",
                                                        j["nodes"] or "-", _when(j["created_at"]), why))
    if len(ans["jobs"]) < ans["total"]:
        print("(%d of %d jobs; --limit N or --all-pages for more)" % (len(ans["jobs"]), ans["total"]), file=sys.stderr)
    return 0


def cmd_show(args) -> int:
    job = _api(args, "GET", _jpath(_resolve_job(args, args.job)))
    if args.json:
        _print_json(job)
        return 0
    if args.script:
        sys.stdout.write(job.get("script") or "")
        if not job.get("script"):
            print("aiportal: job %s has no batch script yet (state %s)" % (job["id"], job["state"]), file=sys.stderr)
        return 0
    req = job.get("request") or {}
    rows = [
        ("job", job["id"]), ("name", job["name"]), ("owner", job.get("owner") or "-"),
        ("state", job["state"] + (" (%s)" % (job.get("reason_text") or job["reason"]) if job.get("reason") else "")),
        ("exit code", "-" if job.get("exit_code") is None else str(job["exit_code"])),
        ("slurm job", (job.get("slurm_job_id") or "-") + (" (submitted with sbatch)" if job.get("external") else "")),
        ("node type", "%s on %s, %s GPU(s)" % (job.get("node_type") or "-", job.get("partition") or "-",
                                                job.get("gpus"))),
        ("nodes", job.get("nodes") or "-"), ("image", job.get("image") or "-"),
        ("command", shlex.join(req["command"]) if isinstance(req.get("command"), list) else "-"),
    ]
    for key, label in (("inputs", "inputs"), ("output", "output"), ("time_limit", "time limit"),
                       ("sweep", "sweep"), ("project", "project")):
        value = req.get(key)
        if value:
            rows.append((label, ", ".join(value) if isinstance(value, list) else
                         "; ".join("%s=%s" % (k, ",".join(map(str, v))) for k, v in value.items())
                         if isinstance(value, dict) else str(value)))
    if job.get("restarts"):
        rows.append(("restarts", str(job["restarts"])))
    if job.get("stage_out_pending"):
        rows.append(("stage out", "PENDING: outputs kept at %s" % ", ".join(map(str, job["stage_out_pending"]))))
    for key in ("created_at", "submitted_at", "started_at", "ended_at"):
        rows.append((key.replace("_at", ""), _when(job.get(key), seconds=True)))
    for label, value in rows:
        print("%-11s %s" % (label, value))
    print()
    print("timeline:")
    for ev in job.get("events", []):
        print("  %s  %-13s %-10s %s%s" % (_when(ev["at"], seconds=True), ev["kind"], ev.get("state") or "",
                                          ev["message"], (" [%s]" % ev["node"]) if ev.get("node") else ""))
    return 0


def cmd_logs(args) -> int:
    job_id = _resolve_job(args, args.job)
    if args.follow:
        _follow_to_end(args, job_id, args.offset, args.task)
        return 0
    print_log(args, _jpath(job_id, "/log"), {"task": args.task} if args.task is not None else {}, "job %s" % job_id,
              args.offset)
    return 0


def cmd_cancel(args) -> int:
    job_id = _resolve_job(args, args.job)
    job = _api(args, "POST", _jpath(job_id, "/cancel"))
    if args.json:
        _print_json(job)
    else:
        print("cancel requested for job %s (Slurm job %s)" % (job["id"], job.get("slurm_job_id") or "-"))
    return 0



def _add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments `script` and `submit` share."""
    p.add_argument("--image", required=True, help="a .sif path, or an image reference (script: already converted)")
    p.add_argument("--node-type", required=True, help="1card, 4card (see /etc/aiportal/site.toml)")
    p.add_argument("--input", action="append", default=[],
                   help="data for /data/data (repeatable): s3://... is copied in; a shared path is bound read-only "
                        "at /data/data/NAME (see --stage)")
    p.add_argument("--gpu-type", metavar="MODEL", help="the GPU model, one of the node type's (default: any GPU of "
                   "its partition)")
    p.add_argument("--stage", choices=("bind", "copy"), default="bind",
                   help="shared-filesystem inputs: bind them read-only at /data/data/NAME, nothing copied "
                        "(default), or copy them into /data/data")
    p.add_argument("--output", help="where /data/output is kept (and restored from on requeue)")
    p.add_argument("--time", default="01:00:00", help="time limit (default 01:00:00)")
    p.add_argument("--name", default="train", help="job name")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment (repeatable)")
