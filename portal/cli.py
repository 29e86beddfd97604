"""The `aiportal` command line. It talks to the portal's JSON API, like any other client.

    aiportal cluster            partitions and nodes, as a table
    aiportal cluster --json     the same as JSON (GET /api/v1/cluster)

The API token comes from --token-file, else $AIPORTAL_TOKEN, else ~/.config/aiportal/token;
the portal URL from --url, else $AIPORTAL_URL, else http://127.0.0.1:8000.
"""
from __future__ import annotations

import argparse
import json
import os
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
