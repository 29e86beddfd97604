"""The `aiportal` command line.

Jobs, through the portal's JSON API (like any other client):

    aiportal submit --image SIF|REF --node-type 1card|4card [--input URI]... [--output URI]
                    [--time T] [--name N] [--env K=V]... [--gpus N] [--sweep NAME=V1,V2]...
                    [--project P] [--follow] [--json] [--idempotency-key KEY] [--retries N]
                    -- CMD [ARG...]
                                                 submit; prints the job id (--follow: its log,
                                                 then exits with the job's exit code); sent with
                                                 an Idempotency-Key, and again with the same key
                                                 when the portal does not answer or answers 502/503
    aiportal jobs [--state S]... [--limit N] [--all-pages] [--json]
    aiportal show JOB [--json | --script]        one job and its timeline (or its batch script)
    aiportal logs [-f] JOB [--offset N] [--task T]
                                                 the log; -f follows it until the job has ended
    aiportal cancel JOB [--json]
    aiportal stage finish JOB [--wait] [--json]  finish a pending stage-out: the portal runs `aiportal stage out`
                                                 in a Slurm job as you (--wait: print its log, exit 0 when done)
    aiportal cluster [--json]                    partitions and nodes
    aiportal token create [--name N] [--expires-days D] [--scope S ...] [--service NAME] | list | revoke ID
                                                 the caller's own API tokens
    aiportal registry login HOST --username U [--password-stdin] | list | logout HOST
                                                 your registry accounts (checked, kept sealed)
    aiportal image choices [--json] | check REF  images to pick; would REF run for you?
    aiportal image rm ID|REF                     delete one of your registered images
    aiportal image build [-f Dockerfile] [CONTEXT] --tag REGISTRY/REPO:TAG
                                                 build in a Slurm job as you, push to the registry
    aiportal service deploy NAME --image SIF --model URI [--model-file F] [--class C] [--version V]
                    [--replicas N | --min N --max N] [--target-inflight X] [--gpus N] [--wait]
                    [--idempotency-key KEY] [--retries N]
    aiportal service list | show NAME | delete NAME
    aiportal service scale NAME (--replicas N | --min N --max N) [--target-inflight X]
    aiportal service update NAME [--model URI] [--image SIF] [--version V] ... [--weight PERCENT] [--wait]
                                                 inference services behind POST|PUT /service/NAME

JOB is a job id, a unique prefix of one (as `jobs` shows it), or a Slurm job id.

On the node, from the public site settings (/etc/aiportal/site.toml):

    aiportal script --image SIF --node-type 1card|4card [--input URI]... [--output URI]
                    [--time T] [--name N] [--env K=V]... -- CMD [ARG...]
                                                 print the exact batch script, to edit and sbatch
    aiportal image convert REF                   convert to SIF in the shared cache; prints the path
                                                 (as root or the image builder account; root converts as that account)
    aiportal image list [--json]                 cached images, sizes, last use
    aiportal image build [-f Dockerfile] [CONTEXT] --tag REGISTRY/REPO:TAG [--detach]
                                                 build in a Slurm job as you, push; prints REPO@sha256:...
    aiportal image builds [--json] | build-cancel ID
    aiportal stage in --from URI --to DIR [--missing-ok] [--credentials FILE] [--workers N]
                    [--bandwidth-mbps MBIT_S]
    aiportal stage out --from DIR --to URI [--from DIR --to URI]... [--credentials FILE] ...
                                                 move data inside a job (run by the batch script)

On every node, as root (Slurm's HealthCheckProgram runs `aiportal-healthcheck`, the same):

    aiportal health check [--node NAME] [--dry-run] [--json] [--all] [--timeout S]
    aiportal dev fail-node NAME --mode gpu|disk|slurmd|hang | --heal   (dev cluster only)

On the portal host, as root, straight on the database (portal.toml, --config):

    aiportal db upgrade | reconcile | router | monitor
    aiportal user add NAME --unix-user U [--admin] [--email ADDR] [--password-file F | --password-stdin] [--exists-ok]
    aiportal user list [--json] | passwd NAME (--password-file F | --password-stdin) | disable NAME | enable NAME
    aiportal token create --user NAME [--name N] [--expires-days D]   prints only the token
    aiportal token list --user NAME | revoke ID --user NAME
    aiportal project add NAME [--slurm-account A] [--member USER]... [--exists-ok]
    aiportal image publish-site --catalogue FILE   the site's base images (role site_images)

Passwords are read from a file or stdin, never from the command line, and never printed.

The API token comes from --token-file, else $AIPORTAL_TOKEN, else ~/.config/aiportal/token;
the portal URL from --url, else $AIPORTAL_URL, else portal_url in /etc/aiportal/site.toml, else
http://127.0.0.1:8000; its HTTPS certificate is checked against --ca FILE, else $AIPORTAL_CA, else
portal_ca_file in site.toml, else the system's CAs. Every error is printed as
``aiportal: MESSAGE`` and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from portal import __version__
from portal.scopes import SCOPES
from portal.cli import registries, site_images, stage
from portal.cli.builds import cmd_build_run, cmd_image_build, cmd_image_build_cancel, cmd_image_builds
from portal.cli.accounts import (_add_config, _add_password, cmd_project_add, cmd_token_create, cmd_token_list,
                                 cmd_token_revoke, cmd_user_add, cmd_user_disable, cmd_user_list, cmd_user_passwd)
# the client side is also this package's API (tests, benches)
from portal.cli.client import (DEFAULT_URL, ApiError, CliError, PortalUnreachable, SseEvent,  # noqa: F401
                               SseParser, _add_create_arguments, _api, create, follow_log, site_defaults)
from portal.cli.daemons import (cmd_db_upgrade, cmd_fail_node, cmd_health_check, cmd_monitor, cmd_reconcile,
                                cmd_router)
from portal.cli.jobs import _add_job_arguments, cmd_cancel, cmd_jobs, cmd_logs, cmd_show, cmd_submit
from portal.cli.services import (_add_policy_arguments, _add_spec_arguments, cmd_service_delete, cmd_service_deploy,
                                 cmd_service_list, cmd_service_logs, cmd_service_scale, cmd_service_show,
                                 cmd_service_update, cmd_service_access)
from portal.cli.tools import cmd_cluster, cmd_image_convert, cmd_image_list, cmd_script, cmd_sessions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiportal", description="Slurm-backed AI training and inference portal")
    parser.add_argument("--version", action="version", version="aiportal %s" % __version__)
    parser.add_argument("--url", help="portal URL (default: $AIPORTAL_URL, else portal_url in site.toml, else %s)"
                        % DEFAULT_URL)
    parser.add_argument("--ca", metavar="FILE", help="CA bundle for the portal's HTTPS certificate (default: "
                        "$AIPORTAL_CA, else portal_ca_file in site.toml, else the system's CAs)")
    parser.add_argument("--token-file", help="file holding the API token")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the portal")
    parser.add_argument("--reconnect-for", type=float, default=120.0, metavar="SECONDS",
                        help="logs -f, submit --follow: keep reconnecting a lost log stream this long (default 120)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cluster", help="partitions, nodes, their state and GPUs")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("submit", help="submit a training job through the portal; prints its id")
    _add_job_arguments(p)
    p.add_argument("--gpus", type=int, help="GPUs per node (default: all of the node type's)")
    p.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                   help="a parameter grid: one array task per combination, as environment variables (repeatable)")
    p.add_argument("--project", help="charge the job to this project")
    p.add_argument("--follow", "-f", action="store_true",
                   help="follow the log until the job ends; exit with the job's exit code")
    p.add_argument("--json", action="store_true", help="print the API's JSON of the new job")
    _add_create_arguments(p)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="your jobs, newest first")
    p.add_argument("--state", action="append", default=[], help="only jobs in this state (repeatable)")
    p.add_argument("--limit", type=int, default=50, help="at most this many (1-500, default 50)")
    p.add_argument("--all-pages", action="store_true", help="every job, however many")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("show", help="one job: request, state, timeline")
    p.add_argument("job", help="job id (or a unique prefix, or its Slurm job id)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print the API's JSON")
    g.add_argument("--script", action="store_true", help="print only the batch script that was submitted")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("logs", help="a job's log; -f follows it until the job ends")
    p.add_argument("job", help="job id (or a unique prefix, or its Slurm job id)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing as the log grows, until the job ends")
    p.add_argument("--offset", type=int, default=0, help="start at this byte of the log")
    p.add_argument("--task", help="array task (sweeps; default 0)")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job", help="job id (or a unique prefix, or its Slurm job id)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("script", help="print the batch script the portal would submit")
    _add_job_arguments(p)
    p.add_argument("--credentials", metavar="FILE",
                   help="your data-source credentials file for s3:// locations (mode 0600; the job reads it, "
                        "the script carries only its path)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    p.set_defaults(func=cmd_script)

    p = sub.add_parser("image", help="convert images into the shared SIF cache, list it")
    isub = p.add_subparsers(dest="image_command", required=True)
    c = isub.add_parser("convert", help="convert REF to SIF (once per content digest); prints the SIF path")
    c.add_argument("ref", help="docker://HOST/REPO@sha256:..., docker-archive:/x.tar, oci-archive:/x.tar, "
                               "oci:/layout:tag, /x.def, /x.sif")
    c.add_argument("--cache", help="cache folder (default: image_cache from site.toml)")
    c.add_argument("--authfile", metavar="FILE", help="registry account for docker:// (containers-auth.json); "
                                                      "removed after the conversion")
    c.add_argument("--as-digest", metavar="DIGEST", help=argparse.SUPPRESS)  # root's .def builds, handed over
    c.set_defaults(func=cmd_image_convert)
    c = isub.add_parser("list", help="cached images with sizes and last use")
    c.add_argument("--cache", help="cache folder (default: image_cache from site.toml)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_image_list)
    c = isub.add_parser("build", help="build a Dockerfile in a Slurm job (buildah, as you) and push it with your "
                                      "registry account; prints REPO@sha256:... when pushed")
    c.add_argument("context", nargs="?", default=".", help="the build context folder (default .)")
    c.add_argument("-f", "--file", help="the Dockerfile (default CONTEXT/Dockerfile)")
    c.add_argument("-t", "--tag", required=True, help="REGISTRY/REPOSITORY:TAG to push")
    c.add_argument("--detach", action="store_true", help="print the build id and do not follow the log")
    c.add_argument("-q", "--quiet", action="store_true", help="no upload progress")
    c.set_defaults(func=cmd_image_build)
    c = isub.add_parser("builds", help="your Dockerfile builds, newest first")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_image_builds)
    c = isub.add_parser("build-cancel", help="cancel a build")
    c.add_argument("build", type=int)
    c.set_defaults(func=cmd_image_build_cancel)
    c = isub.add_parser("build-run", help="(run by a build's Slurm job, as the user) buildah bud + push")
    c.add_argument("--dir", required=True, help="the build folder the portal prepared")
    c.set_defaults(func=cmd_build_run)
    registries.add_parsers(sub, isub)
    site_images.add_publish_site_parser(isub)

    stage.add_parser(sub)

    p = sub.add_parser("db", help="the portal's database (root, on the portal host)")
    dsub = p.add_subparsers(dest="db_command", required=True)
    c = dsub.add_parser("upgrade", help="create or migrate the schema to this version's")
    _add_config(c)
    c.set_defaults(func=cmd_db_upgrade)

    p = sub.add_parser("reconcile", help="keep the database in step with Slurm (started with the portal)")
    _add_config(p)
    p.add_argument("--interval", type=float, help="seconds between cycles (default: reconcile_interval_s)")
    p.add_argument("--once", action="store_true", help="run one cycle and print what it did")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("router", help="serve POST|PUT /service/NAME, the inference services' front door "
                                      "(started with the portal)")
    _add_config(p)
    p.add_argument("--listen", help="HOST:PORT or unix:PATH (default: router_listen)")
    p.set_defaults(func=cmd_router)

    p = sub.add_parser("monitor", help="recover jobs hit by node failures, record node events, notify owners "
                                       "(started with the portal)")
    _add_config(p)
    p.add_argument("--interval", type=float, help="seconds between cycles (default: monitor_interval_s)")
    p.add_argument("--once", action="store_true", help="run one cycle and print what it did")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("health", help="node health checks (Slurm's HealthCheckProgram)")
    hsub = p.add_subparsers(dest="health_command", required=True)
    c = hsub.add_parser("check", help="check this node; drain it when a check fails, resume it after passes")
    c.add_argument("--node", help="the Slurm node to check (default: $SLURMD_NODENAME, else the host name)")
    c.add_argument("--dry-run", action="store_true", help="check and report only: never drain, resume or count passes")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--all", action="store_true", help="report every failure (default: up to the first one)")
    c.add_argument("--timeout", type=float, help="watchdog for the whole run in seconds (default: health.timeout_s)")
    c.set_defaults(func=cmd_health_check)

    p = sub.add_parser("dev", help="dev cluster tools (root; refused unless health.dev_faults is set)")
    dsub = p.add_subparsers(dest="dev_command", required=True)
    c = dsub.add_parser("fail-node", help="inject a fault into one emulated node, or --heal it")
    c.add_argument("node")
    c.add_argument("--mode", choices=["gpu", "disk", "slurmd", "hang"],
                   help="gpu: move its fake GPU device aside; disk: its scratch reads as full; slurmd: kill "
                        "its slurmd and its jobs' processes (node death); hang: its shared-filesystem probe blocks")
    c.add_argument("--heal", action="store_true", help="undo the fault (all of the node's faults without --mode)")
    c.set_defaults(func=cmd_fail_node)

    p = sub.add_parser("user", help="portal accounts (root, on the portal host)")
    usub = p.add_subparsers(dest="user_command", required=True)
    c = usub.add_parser("add", help="add a user mapped to a Unix account (no password: API tokens only)")
    c.add_argument("name")
    c.add_argument("--unix-user", required=True, help="the Unix account the user's jobs run as (never root)")
    c.add_argument("--admin", action=argparse.BooleanOptionalAction, default=None,
                   help="an admin (sees every job, drains nodes); --no-admin takes it away with --exists-ok")
    _add_password(c, required=False)
    c.add_argument("--email", help="where health and recovery notifications go (default: UNIXUSER@notify_email_domain; "
                                   "'' removes it)")
    c.add_argument("--exists-ok", action="store_true",
                   help="an existing user is not an error: its admin flag and password are set as given")
    _add_config(c)
    c.set_defaults(func=cmd_user_add)
    c = usub.add_parser("list", help="users, their Unix accounts and tokens")
    c.add_argument("--json", action="store_true")
    _add_config(c)
    c.set_defaults(func=cmd_user_list)
    c = usub.add_parser("passwd", help="set a user's password (from a file or stdin)")
    c.add_argument("name")
    _add_password(c, required=True)
    _add_config(c)
    c.set_defaults(func=cmd_user_passwd)
    for verb, disable, text in (("disable", True, "stop a user's logins and tokens"),
                                ("enable", False, "let a disabled user in again")):
        c = usub.add_parser(verb, help=text)
        c.add_argument("name")
        _add_config(c)
        c.set_defaults(func=cmd_user_disable, disable=disable)

    p = sub.add_parser("service", help="inference services: replicas behind POST|PUT /service/NAME")
    ssub = p.add_subparsers(dest="service_command", required=True)
    c = ssub.add_parser("deploy", help="deploy a model as a service")
    c.add_argument("name", help="lower-case letters, digits and '-': the URL /service/NAME")
    _add_spec_arguments(c, required=True)
    _add_policy_arguments(c)
    c.add_argument("--public", action="store_true",
                   help="anyone may call it without a token (rate-limited per client address)")
    c.add_argument("--wait", action="store_true", help="wait until the replicas are ready")
    c.add_argument("--wait-timeout", type=float, default=600.0, metavar="SECONDS")
    c.add_argument("--json", action="store_true", help="print the API's JSON")
    _add_create_arguments(c)
    c.set_defaults(func=cmd_service_deploy)
    c = ssub.add_parser("list", help="your services")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_service_list)
    c = ssub.add_parser("show", help="a service and its replicas")
    c.add_argument("name")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_service_show)
    c = ssub.add_parser("scale", help="set the replica count, or the autoscaling range")
    c.add_argument("name")
    _add_policy_arguments(c)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_service_scale)
    c = ssub.add_parser("access", help="who may call it: --public (anyone, without a token) or --private "
                                       "(a token of yours, or an invoke key)")
    c.add_argument("name")
    who = c.add_mutually_exclusive_group(required=True)
    who.add_argument("--public", dest="public", action="store_true")
    who.add_argument("--private", dest="public", action="store_false")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_service_access)
    c = ssub.add_parser("update", help="a new version: rolling update (one replica at a time), or a gray release "
                                       "with --weight")
    c.add_argument("name")
    _add_spec_arguments(c, required=False)
    c.add_argument("--weight", type=int, metavar="PERCENT",
                   help="gray release: with new fields (1-99), the new version runs beside the current one for this "
                        "share of the requests; alone, changes the share (100: roll it out, 0: stop it)")
    c.add_argument("--wait", action="store_true", help="wait until the rolling update is over")
    c.add_argument("--wait-timeout", type=float, default=600.0, metavar="SECONDS")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_service_update)
    c = ssub.add_parser("logs", help="a replica's log (-f: as it grows, until the replica ends)")
    c.add_argument("name")
    c.add_argument("--replica", default="0", help="its number in `service show` (default 0, the oldest) or its id")
    c.add_argument("-f", "--follow", action="store_true", help="keep printing as the log grows")
    c.add_argument("--offset", type=int, default=0, help="start at this byte")
    c.set_defaults(func=cmd_service_logs)
    c = ssub.add_parser("delete", help="delete a service (its replicas are stopped)")
    c.add_argument("name")
    c.set_defaults(func=cmd_service_delete)

    p = sub.add_parser("token", help="API tokens: your own (through the API), or any user's with --user (root)")
    tsub = p.add_subparsers(dest="token_command", required=True)
    c = tsub.add_parser("create", help="a new API token, printed once (and nothing else on stdout)")
    c.add_argument("--user", help="for this user, straight on the database (root, on the portal host)")
    c.add_argument("--name", help="a label to tell tokens apart")
    c.add_argument("--expires-days", type=int, metavar="D", help="valid for D days (default: until revoked)")
    c.add_argument("--scope", action="append", metavar="SCOPE", dest="scopes",
                   help="what it may do, repeatable: %s (default: the account's full access)" % ", ".join(SCOPES))
    c.add_argument("--service", metavar="NAME",
                   help="it may call only this service of yours (an invoke key: --scope defaults to services:invoke)")
    _add_config(c)
    c.set_defaults(func=cmd_token_create)
    c = tsub.add_parser("list", help="tokens (never the tokens themselves)")
    c.add_argument("--user", help="this user's, straight on the database (root, on the portal host)")
    c.add_argument("--json", action="store_true")
    _add_config(c)
    c.set_defaults(func=cmd_token_list)
    c = tsub.add_parser("revoke", help="revoke a token by its id (see `token list`)")
    c.add_argument("id", type=int)
    c.add_argument("--user", help="a token of this user, straight on the database (root, on the portal host)")
    _add_config(c)
    c.set_defaults(func=cmd_token_revoke)

    p = sub.add_parser("sessions", help="your logged-in browsers; --revoke logs out everywhere")
    p.add_argument("--revoke", action="store_true",
                   help="end every web session of your account (log out everywhere; API tokens stay)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sessions)

    p = sub.add_parser("project", help="projects (root, on the portal host)")
    psub = p.add_subparsers(dest="project_command", required=True)
    c = psub.add_parser("add", help="add a project, with members")
    c.add_argument("name")
    c.add_argument("--slurm-account", help="Slurm account its jobs are charged to (--account)")
    c.add_argument("--description")
    c.add_argument("--member", action="append", default=[], metavar="USER", help="a member (repeatable)")
    c.add_argument("--exists-ok", action="store_true", help="an existing project is not an error (members are added)")
    _add_config(c)
    c.set_defaults(func=cmd_project_add)
    return parser


def healthcheck_main() -> int:
    """``aiportal-healthcheck``: what Slurm's HealthCheckProgram runs (it passes no arguments)."""
    return main(["health", "check"] + sys.argv[1:])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.url is None or args.ca is None:
            url, ca = site_defaults()
            args.url = url if args.url is None else args.url
            args.ca = ca if args.ca is None else args.ca
        return args.func(args)
    except CliError as e:
        print("aiportal: %s" % e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
