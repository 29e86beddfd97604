"""The `aiportal` command line.

    aiportal cluster [--json]                    partitions and nodes (GET /api/v1/cluster)
    aiportal script --image SIF --node-type 1card|4card [--input URI]... [--output URI]
                    [--time T] [--name N] [--env K=V]... -- CMD [ARG...]
                                                 print the exact batch script, to edit and sbatch
    aiportal image convert REF                   convert to SIF in the shared cache; prints the path
    aiportal image list [--json]                 cached images, sizes, last use
    aiportal stage in --from URI --to DIR [--missing-ok] [--credentials FILE] [--workers N]
                    [--bandwidth-mbps MBIT_S]
    aiportal stage out --from DIR --to URI [--credentials FILE] ...
                                                 move data inside a job (run by the batch script)

`cluster` talks to the portal's JSON API, like any other client; `script` and `stage` work
on the node from the public site settings (/etc/aiportal/site.toml).

The API token comes from --token-file, else $AIPORTAL_TOKEN, else ~/.config/aiportal/token;
the portal URL from --url, else $AIPORTAL_URL, else http://127.0.0.1:8000.
"""
from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import shlex
import sys
import urllib.error
import urllib.request
from pathlib import Path

from portal import __version__

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TOKEN_FILE = Path.home() / ".config" / "aiportal" / "token"


class CliError(Exception):
    pass


def _token(args) -> str:
    if args.token_file:
        path = Path(args.token_file)
    elif os.environ.get("AIPORTAL_TOKEN"):
        return os.environ["AIPORTAL_TOKEN"].strip()
    else:
        path = DEFAULT_TOKEN_FILE
    try:
        return path.read_text().strip()
    except OSError as e:
        raise CliError("cannot read the API token from %s (%s); pass --token-file FILE or set "
                       "AIPORTAL_TOKEN" % (path, e.strerror)) from e


def api_get(args, path: str) -> dict:
    url = args.url.rstrip("/") + "/api/v1" + path
    req = urllib.request.Request(url, headers={"Authorization": "Bearer " + _token(args),
                                               "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        try:
            body = json.load(e)
            detail = "%s: %s" % (body.get("error"), body.get("message"))
        except ValueError:
            detail = e.reason
        finally:
            e.close()
        raise CliError("%s answered %d (%s)" % (url, e.code, detail)) from e
    except urllib.error.URLError as e:
        raise CliError("cannot reach the portal at %s (%s); is it running? (`make run`)"
                       % (args.url, e.reason)) from e


def cmd_cluster(args) -> int:
    view = api_get(args, "/cluster")
    if args.json:
        json.dump(view, sys.stdout, indent=2)
        print()
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


def _site_settings():
    from portal.settings import Settings
    return Settings.load(require_secrets=False)


def _parse_env(items: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError("--env %r: write it as NAME=VALUE" % item)
        out.append((key, value))
    return tuple(out)


def cmd_script(args) -> int:
    from portal.services.training import TrainingRequest, job_dir_for, render_request
    from slurm.errors import SpecError
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise CliError("give the command after --, e.g. aiportal script ... -- python3 train.py")
    image = args.image
    if not image.startswith("/") or not image.endswith(".sif"):
        image = _cached_image(args.image)
    req = TrainingRequest(user=getpass.getuser(), image_sif=image, node_type=args.node_type,
                          command=tuple(command), name=args.name, inputs=tuple(args.input),
                          output=args.output, time_limit=args.time, env=_parse_env(args.env))
    settings = _site_settings()
    try:
        text = render_request(settings, req)
    except SpecError as e:
        raise CliError(str(e)) from e
    sys.stdout.write(text)
    print("# before sbatch, create the job's log folder: mkdir -p %s"
          % shlex.quote(str(job_dir_for(settings, req.user, req.job_id) / "logs")), file=sys.stderr)
    return 0


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


def cmd_image_convert(args) -> int:
    from containers.cache import SifCache
    from containers.errors import ContainerError
    from containers.refs import parse_image_ref
    logging.basicConfig(level=logging.INFO, format="[aiportal image] %(message)s")
    settings = _site_settings()
    cache_root = Path(args.cache or settings.image_cache)
    if not os.access(cache_root, os.W_OK):
        raise CliError("the image cache %s is written only by %s (and root); submit jobs through the "
                       "portal, which converts images for you" % (cache_root, settings.image_builder_user))
    try:
        sif = SifCache(cache_root).ensure(parse_image_ref(args.ref),
                                          progress=lambda msg: print("[aiportal image] %s" % msg, file=sys.stderr))
    except ContainerError as e:
        raise CliError(str(e)) from e
    print(sif)
    return 0


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
    try:
        if args.direction == "in":
            stats = stage_in(args.source, args.dest, missing_ok=args.missing_ok, **kw)
        else:
            stats = stage_out(args.source, args.dest, pending_record=args.pending_record, **kw)
    except StorageError as e:
        raise CliError("stage %s: %s" % (args.direction, e)) from e
    except ValueError as e:
        raise CliError("stage %s: %s" % (args.direction, e)) from e
    print("[aiportal stage] %s %s -> %s: %s" % (args.direction, args.source, args.dest, stats.summary()), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiportal", description="Slurm-backed AI training and inference portal")
    parser.add_argument("--version", action="version", version="aiportal %s" % __version__)
    parser.add_argument("--url", default=os.environ.get("AIPORTAL_URL", DEFAULT_URL), help="portal URL")
    parser.add_argument("--token-file", help="file holding the API token")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the portal")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cluster", help="partitions, nodes, their state and GPUs")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("script", help="print the batch script the portal would submit")
    p.add_argument("--image", required=True, help="a .sif path, or an image reference already converted")
    p.add_argument("--node-type", required=True, help="1card, 4card (see /etc/aiportal/site.toml)")
    p.add_argument("--input", action="append", default=[], help="data to stage into /data/data (repeatable)")
    p.add_argument("--output", help="where /data/output is kept (and restored from on requeue)")
    p.add_argument("--time", default="01:00:00", help="time limit (default 01:00:00)")
    p.add_argument("--name", default="train", help="job name")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment (repeatable)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    p.set_defaults(func=cmd_script)

    p = sub.add_parser("image", help="convert images into the shared SIF cache, list it")
    isub = p.add_subparsers(dest="image_command", required=True)
    c = isub.add_parser("convert", help="convert REF to SIF (once per content digest); prints the SIF path")
    c.add_argument("ref", help="docker-archive:/x.tar, oci-archive:/x.tar, oci:/layout:tag, /x.def, /x.sif")
    c.add_argument("--cache", help="cache folder (default: image_cache from site.toml)")
    c.set_defaults(func=cmd_image_convert)
    c = isub.add_parser("list", help="cached images with sizes and last use")
    c.add_argument("--cache", help="cache folder (default: image_cache from site.toml)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_image_list)

    p = sub.add_parser("stage", help="move data in or out of a job (run inside jobs)")
    p.add_argument("direction", choices=["in", "out"])
    p.add_argument("--from", dest="source", required=True)
    p.add_argument("--to", dest="dest", required=True)
    p.add_argument("--missing-ok", action="store_true", help="stage in: a missing source is not an error")
    p.add_argument("--credentials", metavar="FILE",
                   help="data-source credentials for s3:// locations (the portal writes one into the job dir)")
    p.add_argument("--workers", type=int, help="concurrent requests for s3:// transfers (default 8, or the data source's)")
    p.add_argument("--bandwidth-mbps", type=float, metavar="MBIT_S",
                   help="cap s3:// transfers at this many megabits per second (a data source's own cap still "
                        "applies if lower)")
    p.add_argument("--retries", type=int, metavar="N",
                   help="tries per request on transient errors before giving up (default 6, ~15 s of backoff)")
    p.add_argument("--progress-every", type=float, metavar="SECONDS", help="seconds between progress lines (default 5)")
    p.add_argument("--pending-record", metavar="FILE",
                   help="stage out: where to record a stage-out that did not finish "
                        "(default: STAGE_OUT_PENDING.<dir>.json beside the directory)")
    p.set_defaults(func=cmd_stage)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as e:
        print("aiportal: %s" % e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
