"""``aiportal stage``: move data in and out inside a job (``in``, ``out``: run by the batch script
on the node, :func:`portal.cli.tools.cmd_stage`), and finish a job's pending stage-out through the
portal (``finish``: an API call, like ``cancel``)."""
from __future__ import annotations

import codecs
import http.client
import sys
import time
import urllib.parse

from portal.cli.client import ApiError, CliError, PortalUnreachable, _api, _print_json
from portal.cli.jobs import _jpath, _resolve_job
from portal.cli.tools import cmd_stage


def add_parser(sub) -> None:
    p = sub.add_parser("stage", help="move data in or out of a job (in, out: run inside jobs); finish a job's "
                                     "pending stage-out through the portal (finish)")
    ssub = p.add_subparsers(dest="direction", required=True)
    for direction, text in (("in", "copy a location into a folder (inputs, and the outputs of an earlier run)"),
                            ("out", "copy folders to their locations; a failure leaves a STAGE_OUT_PENDING record "
                                    "beside the folder and the outputs in place")):
        c = ssub.add_parser(direction, help=text)
        if direction == "in":
            c.add_argument("--from", dest="source", required=True, metavar="URI")
            c.add_argument("--to", dest="dest", required=True, metavar="DIR")
            c.add_argument("--missing-ok", action="store_true", help="a missing source is not an error")
        else:
            c.add_argument("--from", dest="source", required=True, action="append", metavar="DIR",
                           help="a folder to stage out; repeat --from DIR --to URI for several (each in turn)")
            c.add_argument("--to", dest="dest", required=True, action="append", metavar="URI")
            c.add_argument("--pending-record", metavar="FILE",
                           help="where to record a stage-out that did not finish (default: "
                                "STAGE_OUT_PENDING.<dir>.json beside the folder; one --from only)")
        c.add_argument("--credentials", metavar="FILE",
                       help="data-source credentials for s3:// locations (the portal writes one into the job dir)")
        c.add_argument("--workers", type=int,
                       help="concurrent requests for s3:// transfers (default 8, or the data source's)")
        c.add_argument("--bandwidth-mbps", type=float, metavar="MBIT_S",
                       help="cap s3:// transfers at this many megabits per second (a data source's own cap still "
                            "applies if lower)")
        c.add_argument("--retries", type=int, metavar="N",
                       help="tries per request on transient errors before giving up (default 6, ~15 s of backoff)")
        c.add_argument("--progress-every", type=float, metavar="SECONDS",
                       help="seconds between progress lines (default 5)")
        c.set_defaults(func=cmd_stage)
    c = ssub.add_parser("finish", help="finish a job's pending stage-out: the portal runs `aiportal stage out` in a "
                                       "small Slurm job as the job's user")
    c.add_argument("job", help="job id (or a unique prefix, or its Slurm job id)")
    c.add_argument("--wait", action="store_true",
                   help="follow it to the end, printing its log; exit 0 once nothing is pending, 1 if it failed")
    c.add_argument("--wait-timeout", type=float, metavar="SECONDS", help="give up waiting after this long (default: "
                                                                        "no limit)")
    c.add_argument("--json", action="store_true", help="print the API's JSON of the job")
    c.set_defaults(func=cmd_stage_finish)


def _read_log(args, job_id: str, offset: int) -> tuple[bytes, int]:
    """Bytes of the stage-out log from ``offset`` and where to go on."""
    resp = _api(args, "GET", _jpath(job_id, "/stage-out/log?" + urllib.parse.urlencode({"offset": str(offset)})),
                stream=True, headers={"Accept": "text/plain"})
    try:
        with resp:
            data = resp.read()
            nxt = resp.headers.get("X-Log-Offset")
    except (TimeoutError, OSError, http.client.HTTPException) as e:
        raise PortalUnreachable("the portal at %s dropped the stage-out log of job %s at byte %d (%s)"
                                % (args.url, job_id, offset, e)) from e
    return data, int(nxt) if nxt and nxt.isdigit() else offset + len(data)


def _log_end(args, job_id: str) -> int:
    """Where the stage-out log ends now (earlier attempts' lines are not printed again)."""
    offset = 0
    while True:
        data, offset = _read_log(args, job_id, offset)
        if not data:
            return offset


def cmd_stage_finish(args) -> int:
    job_id = _resolve_job(args, args.job)
    offset = _log_end(args, job_id) if args.wait else 0
    try:
        job = _api(args, "POST", _jpath(job_id, "/stage-out"))
    except ApiError as e:
        if not (args.wait and e.status == 409):
            raise
        job = _api(args, "GET", _jpath(job_id))         # an attempt runs already: follow that one
        if (job.get("stage_out_finish") or {}).get("state") not in ("submitting", "running"):
            raise
        print("aiportal: the stage-out of job %s is being finished already; following it" % job_id, file=sys.stderr)
    finish = job.get("stage_out_finish") or {}
    if args.json:
        _print_json(job)
    else:
        print("finishing the stage-out of job %s in Slurm job %s (%s)" % (job["id"], finish.get("slurm_job_id") or "-",
                                                                          ", ".join(_destinations(job)) or "-"))
    if not args.wait:
        return 0
    deadline = None if args.wait_timeout is None else time.monotonic() + args.wait_timeout
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while True:
        data, offset = _read_log(args, job_id, offset)
        if data:
            sys.stdout.write(decoder.decode(data))
            sys.stdout.flush()
            continue
        job = _api(args, "GET", _jpath(job_id))
        finish = job.get("stage_out_finish") or {}
        if not job.get("stage_out_pending") or finish.get("state") == "failed":
            break
        if deadline is not None and time.monotonic() > deadline:
            raise CliError("the stage-out of job %s is still being finished after %gs (Slurm job %s); follow it "
                           "with `aiportal stage finish %s --wait` later, or `aiportal show %s`"
                           % (job_id, args.wait_timeout, finish.get("slurm_job_id") or "-", job_id[:8], job_id[:8]))
        time.sleep(2.0)
    data, offset = _read_log(args, job_id, offset)
    sys.stdout.write(decoder.decode(data) + decoder.decode(b"", final=True))
    sys.stdout.flush()
    if not job.get("stage_out_pending"):
        print("aiportal: the stage-out of job %s finished: nothing is pending any more" % job_id, file=sys.stderr)
        return 0
    print("aiportal: finishing the stage-out of job %s failed: %s\n(the outputs are still in the job's folder; "
          "run `aiportal stage finish %s` again once the cause is fixed)"
          % (job_id, finish.get("reason") or "see its log", job_id[:8]), file=sys.stderr)
    return 1


def _destinations(job: dict) -> list[str]:
    return sorted({str(r.get("destination")) for r in job.get("stage_out_pending") or [] if isinstance(r, dict)})

