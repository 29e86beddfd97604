"""Registry accounts and image pickers through the portal's API:

    aiportal registry login HOST --username U [--password-stdin | --password-file F]
    aiportal registry list | logout HOST
    aiportal image choices [--json]      site base images, your recent images, your registries' tags
    aiportal image check REF             would REF run for you? (exists, readable, converted)
    aiportal image rm ID|REF             delete one of your registered images (its SIF leaves the
                                         cache only when nothing else uses it)

The password is read from stdin, a file or a prompt (never argv), sent once to the portal, which
checks it against the registry and keeps it sealed.
"""
from __future__ import annotations

import getpass
import sys

from portal.cli.client import CliError, _api, _print_json, _when


def _password(args) -> str:
    if args.password_file:
        try:
            with open(args.password_file) as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise CliError("cannot read the password from %s (%s)" % (args.password_file, e)) from e
    elif args.password_stdin or not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        text = getpass.getpass("password for %s at %s: " % (args.username, args.registry))
    text = text.rstrip("\r\n")
    if not text or "\n" in text:
        raise CliError("give the password as one line (--password-stdin reads it from stdin)")
    return text


def cmd_registry_login(args) -> int:
    ans = _api(args, "POST", "/registries", {"registry": args.registry, "username": args.username,
                                             "password": _password(args)})
    print("logged in to %s as %s (checked just now; the password is kept sealed)" % (ans["registry"], ans["username"]))
    return 0


def cmd_registry_list(args) -> int:
    rows = _api(args, "GET", "/registries")["registries"]
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no registry accounts; add one: aiportal registry login HOST --username U --password-stdin")
        return 0
    print("%-30s %-20s %s" % ("REGISTRY", "USER", "CHECKED"))
    for r in rows:
        print("%-30s %-20s %s" % (r["registry"], r["username"], _when(r["checked_at"])))
    return 0


def cmd_registry_logout(args) -> int:
    _api(args, "DELETE", "/registries/%s" % args.registry)
    print("forgot your account at %s" % args.registry)
    return 0


def cmd_image_choices(args) -> int:
    ans = _api(args, "GET", "/images/choices")
    if args.json:
        _print_json(ans)
        return 0
    print("site base images:")
    for s in ans["site"] or [{"ref": "(none published)", "title": ""}]:
        print("  %-50s %s" % (s["ref"], s["title"]))
    if ans["recent"]:
        print("your recent images:")
        for r in ans["recent"]:
            print("  %s" % r)
    if ans["repositories"]:
        print("in your registries:")
        for r in ans["repositories"]:
            for ref in r["refs"] or ["docker://%s/%s (no tags)" % (r["registry"], r["repository"])]:
                print("  %s" % ref)
    for host, why in ans["problems"].items():
        print("(%s could not be listed: %s)" % (host, why), file=sys.stderr)
    return 0


def cmd_image_check(args) -> int:
    import urllib.parse
    ans = _api(args, "GET", "/images/check?ref=%s" % urllib.parse.quote(args.ref, safe=""))
    if args.json:
        _print_json(ans)
    elif ans["ok"]:
        print("%s: %s%s" % (args.ref, ans["message"], " (%s)" % ans["pinned"] if ans.get("pinned") else ""))
    else:
        print("%s: %s" % (args.ref, ans["message"]), file=sys.stderr)
    return 0 if ans["ok"] else 1


def _image_id(args, which: str) -> int:
    """An image's id, or the id of the caller's one registered image with this reference."""
    if which.isdigit():
        return int(which)
    found = [i["id"] for i in _api(args, "GET", "/images")["images"] if i["ref"] == which]
    if len(found) != 1:
        raise CliError("image %s: %s" % (which, "not found, or not yours (the Images page; GET /api/v1/images)" if not found else
                                         "registered %d times (ids %s); give the id" % (
                                             len(found), ", ".join(map(str, found)))))
    return found[0]


def cmd_image_rm(args) -> int:
    ans = _api(args, "DELETE", "/images/%d" % _image_id(args, args.image))
    if args.json:
        _print_json(ans)
        return 0
    img = ans["image"]
    print("deleted image %s (%s); its SIF %s" % (img["id"], img["ref"], "was removed from the cache"
                                                 if ans["sif_removed"] else "stays: " + "; ".join(ans["kept_because"])))
    return 0


def add_parsers(sub, image_sub) -> None:
    """``registry ...`` under the top level, ``choices`` and ``check`` under ``image``."""
    p = sub.add_parser("registry", help="your accounts at OCI registries (checked at once, kept sealed)")
    rsub = p.add_subparsers(dest="registry_command", required=True)
    c = rsub.add_parser("login", help="add (or replace) your account at a registry")
    c.add_argument("registry", help="HOST[:PORT], e.g. localhost:5000")
    c.add_argument("--username", "-u", required=True)
    g = c.add_mutually_exclusive_group()
    g.add_argument("--password-stdin", action="store_true", help="read the password (or token) from stdin")
    g.add_argument("--password-file", metavar="FILE", help="read the password from FILE")
    c.set_defaults(func=cmd_registry_login)
    c = rsub.add_parser("list", help="your registry accounts")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_registry_list)
    c = rsub.add_parser("logout", help="forget your account at a registry")
    c.add_argument("registry")
    c.set_defaults(func=cmd_registry_logout)
    c = image_sub.add_parser("choices", help="images you can pick: site base images, recent, your registries")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_image_choices)
    c = image_sub.add_parser("check", help="would this image run for you? (exists, readable, converted)")
    c.add_argument("ref")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_image_check)
    c = image_sub.add_parser("rm", help="delete one of your registered images (admins: anyone's); its SIF leaves "
                                        "the cache only when no other image, site image, job or service uses it")
    c.add_argument("image", metavar="ID|REF", help="the image's id, or its reference when you registered it once")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_image_rm)
