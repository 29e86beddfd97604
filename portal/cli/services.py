"""Inference services over the API: deploy, list, show, scale, update, delete."""
from __future__ import annotations

import argparse
import time
import urllib.error
import urllib.parse
import urllib.request

from portal.cli.client import CliError, _api, _print_json, create, follow_stream, print_log



# -- inference services (through the API) --------------------------------------------------------

_SPEC_ARGS = (("image", "image"), ("model", "model"), ("model_file", "model_file"), ("class_name", "class_name"),
              ("version", "version"), ("gpus", "gpus"), ("cpus", "cpus"), ("memory_mb", "memory_mb"),
              ("max_batch_size", "max_batch_size"), ("max_wait_ms", "max_wait_ms"),
              ("max_body_bytes", "max_body_bytes"))
_POLICY_ARGS = (("replicas", "replicas"), ("min_replicas", "min_replicas"), ("max_replicas", "max_replicas"),
                ("target_inflight", "target_inflight"), ("scale_down_delay", "scale_down_delay_s"))


def _fields(args, table) -> dict:
    return {key: getattr(args, attr) for attr, key in table if getattr(args, attr, None) is not None}


def _svc_path(name: str, rest: str = "") -> str:
    return "/services/%s%s" % (urllib.parse.quote(name, safe=""), rest)


def _print_service(svc: dict, url: str) -> None:
    spec = svc.get("spec") or {}
    rows = [("service", svc["name"]), ("url", "%s%s" % (url.rstrip("/"), svc["url"])),
            ("owner", svc.get("owner") or "-"), ("state", svc["state"]),
            ("version", "%s (generation %s)" % (spec.get("version"), svc.get("generation"))),
            ("image", spec.get("image", "-")), ("model", "%s (%s in %s)" % (spec.get("class_name"), spec.get("model_file"),
                                                                          spec.get("model"))),
            ("replicas", "%s ready, %s wanted (min %s, max %s; target %s in flight each)" % (
                svc.get("ready_replicas", "?"), svc["desired_replicas"], svc["min_replicas"], svc["max_replicas"],
                svc["target_inflight"])),
            ("batching", "up to %s per call, waiting at most %s ms" % (spec.get("max_batch_size"), spec.get("max_wait_ms")))]
    if svc.get("next_spec"):
        rows.append(("updating to", "version %s" % svc["next_spec"].get("version")))
    if svc.get("message"):
        rows.append(("message", svc["message"]))
    for label, value in rows:
        print("%-12s %s" % (label, value))
    if svc.get("replicas"):
        print()
        print("  %-3s %-8s %-10s %-8s %-8s %-21s %-9s %s" % ("N", "REPLICA", "PHASE", "VERSION", "SLURM", "ENDPOINT",
                                                          "IN FLIGHT", "MESSAGE"))
        for n, r in enumerate(svc["replicas"]):
            print("  %-3d %-8s %-10s %-8s %-8s %-21s %-9s %s" % (
                n, r["id"][:8], r["phase"], r["version"], r["slurm_job_id"] or "-",
                "%s:%s" % (r["host"], r["port"]) if r.get("port") else "-",
                "-" if r.get("avg_inflight") is None else "%.2f" % r["avg_inflight"], r.get("message") or ""))


def _wait_service(args, name: str, done, what: str) -> dict:
    deadline = time.monotonic() + args.wait_timeout
    while True:
        svc = _api(args, "GET", _svc_path(name))
        if done(svc):
            return svc
        if time.monotonic() > deadline:
            raise CliError("service %s: still no %s after %.0fs (`aiportal service show %s`)" % (name, what,
                                                                                              args.wait_timeout, name))
        time.sleep(1.0)


def cmd_service_deploy(args) -> int:
    body = {"name": args.name, **_fields(args, _SPEC_ARGS), **_fields(args, _POLICY_ARGS)}
    if args.public:
        body["public"] = True
    svc = create(args, "/services", body, "service")
    if args.wait:
        svc = _wait_service(args, args.name, lambda s: s["ready_replicas"] >= max(1, s["desired_replicas"]) or (
            "failed" in (s.get("message") or "")), "ready replicas")
        if svc["ready_replicas"] < 1:
            raise CliError("service %s: %s" % (args.name, svc.get("message")))
    if args.json:
        _print_json(svc)
    else:
        print("service %s deployed: POST or PUT %s%s (%s)" % (
            svc["name"], args.url.rstrip("/"), svc["url"],
            "public: no token needed" if svc.get("public") else "Authorization: Bearer TOKEN"))
    return 0


def cmd_service_access(args) -> int:
    svc = _api(args, "POST", _svc_path(args.name, "/access"), {"public": args.public})
    if args.json:
        _print_json(svc)
    else:
        print("service %s: %s" % (svc["name"], "public: anyone may call %s%s without a token (rate-limited per "
                                  "address)" % (args.url.rstrip("/"), svc["url"]) if svc["public"] else
                                  "private: callers send a token of yours or an invoke key"))
    return 0


def cmd_service_list(args) -> int:
    rows = _api(args, "GET", "/services")["services"]
    if args.json:
        _print_json(rows)
        return 0
    print("%-24s %-9s %-10s %-8s %-10s %s" % ("NAME", "STATE", "VERSION", "READY", "MIN-MAX", "URL"))
    for s in rows:
        print("%-24s %-9s %-10s %-8s %-10s %s" % (s["name"][:24], s["state"], str(s.get("version"))[:10],
                                                 "%s/%s" % (s.get("ready_replicas", 0), s["desired_replicas"]),
                                                 "%s-%s" % (s["min_replicas"], s["max_replicas"]), s["url"]))
    return 0


def cmd_service_show(args) -> int:
    svc = _api(args, "GET", _svc_path(args.name))
    if args.json:
        _print_json(svc)
    else:
        _print_service(svc, args.url)
    return 0


def cmd_service_logs(args) -> int:
    """A replica's log (``--replica``: its number in `service show`, or its id): what it has so
    far, or with -f as it grows until the replica ends."""
    path = _svc_path(args.name, "/replicas/%s/log" % urllib.parse.quote(args.replica, safe=""))
    if args.follow:
        follow_stream(args, "%s?%s" % (path, urllib.parse.urlencode({"follow": "1", "offset": str(args.offset)})),
                      "replica %s of service %s" % (args.replica, args.name),
                      "aiportal service logs %s --replica %s -f --offset {at}" % (args.name, args.replica), args.offset)
        return 0
    print_log(args, path, {}, "replica %s of service %s" % (args.replica, args.name), args.offset)
    return 0


def cmd_service_scale(args) -> int:
    svc = _api(args, "POST", _svc_path(args.name, "/scale"), _fields(args, _POLICY_ARGS))
    if args.json:
        _print_json(svc)
    else:
        print("service %s: %s-%s replicas (now %s wanted)" % (svc["name"], svc["min_replicas"], svc["max_replicas"],
                                                             svc["desired_replicas"]))
    return 0


def cmd_service_update(args) -> int:
    body = _fields(args, _SPEC_ARGS)
    if args.weight is not None:
        body["weight"] = args.weight
    svc = _api(args, "POST", _svc_path(args.name, "/update"), body)
    target = (svc.get("next_spec") or {}).get("version")
    if args.wait and svc.get("next_weight") is not None:
        raise CliError("service %s: a gray release does not end by itself; --wait applies to rolling updates "
                       "(--weight 100)" % args.name)
    if args.wait and target is not None:
        svc = _wait_service(args, args.name, lambda s: s["state"] != "UPDATING", "end of the rolling update")
        if svc.get("version") != target:
            raise CliError("service %s: %s" % (args.name, svc.get("message")))
    if args.json:
        _print_json(svc)
    else:
        print("service %s: %s" % (svc["name"], svc.get("message") or "rolling update to version %s" % target))
    return 0


def cmd_service_delete(args) -> int:
    _api(args, "DELETE", _svc_path(args.name))
    print("service %s: deleting (its replicas are being stopped)" % args.name)
    return 0


def _add_spec_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--image", required=required, help="a .sif path on the shared filesystem")
    p.add_argument("--model", required=required, help="the model folder: s3://SOURCE/bucket/prefix or a shared path")
    p.add_argument("--model-file", help="the .py file in the model folder defining the class (default model.py)")
    p.add_argument("--class", dest="class_name", help="the model class (default Model)")
    p.add_argument("--version", help="a version label (default 1)")
    p.add_argument("--gpus", type=int, help="GPUs per replica (default 0)")
    p.add_argument("--cpus", type=int, help="CPUs per replica (default 1)")
    p.add_argument("--memory-mb", type=int, help="memory per replica (default 2000)")
    p.add_argument("--max-batch-size", type=int, help="requests per execute() call (default 8)")
    p.add_argument("--max-wait-ms", type=float, help="how long a batch waits to fill (default 5)")
    p.add_argument("--max-body-bytes", type=int, help="larger request bodies get 413 (default 16 MiB)")


def _add_policy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, help="a fixed number of replicas (min = max)")
    p.add_argument("--min", dest="min_replicas", type=int, help="autoscale from this many replicas")
    p.add_argument("--max", dest="max_replicas", type=int, help="... up to this many")
    p.add_argument("--target-inflight", type=float, help="requests in flight per replica to aim at (default 4)")
    p.add_argument("--scale-down-delay", type=float, metavar="SECONDS",
                   help="low load this long before a replica is removed (default 60)")
