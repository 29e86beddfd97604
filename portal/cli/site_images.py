"""``aiportal image publish-site``: the site's base images, built from their definitions,
published under ``site/`` in the site registry, seeded into the SIF cache and listed in
``site_images_file`` (containers.publish). Run as root by the ansible role ``site_images``.

Root builds (a definition's debootstrap needs it) and pushes with the site's registry account
(its password file is root's); the SIFs go into the cache as the image builder account, which
owns it: ``runuser -u BUILDER -- aiportal image convert SIF --as-digest DIGEST``, as
``aiportal image convert`` hands over every image root builds.
"""
from __future__ import annotations

import logging
import os
import pwd
import sys
from pathlib import Path

from portal.cli.client import CliError


def _say(message: str) -> None:
    print("[aiportal site-images] %s" % message, file=sys.stderr, flush=True)


def _seed_as(account: pwd.struct_passwd, cache_root: Path, timeout: float):
    """``seed(digest, sif)`` that runs the copy into the cache as ``account``."""
    from containers.builder import run_command
    from portal.cli.convert import builder_env, convert_argv, self_argv

    def seed(digest: str, sif: Path) -> Path:
        argv = convert_argv(account.pw_name, self_argv(), str(sif), str(cache_root), as_digest=digest)
        res = run_command(argv, timeout, env=builder_env(os.environ, account), cwd=Path("/"),
                          hint="%s puts the image into the cache %s" % (account.pw_name, cache_root))
        lines = res.stdout.strip().splitlines()
        return Path(lines[-1]) if lines else cache_root / "sha256" / ("%s.sif" % digest.split(":", 1)[1])
    return seed


def cmd_image_publish_site(args) -> int:
    import containers
    from containers.cache import SifCache
    from containers.errors import ContainerError
    from containers.publish import SitePublisher, parse_catalogue
    from portal.settings import Settings
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="[aiportal site-images] %(message)s")
    if os.geteuid() != 0:
        raise CliError("publish-site runs as root: definitions bootstrap as root, and the site registry's "
                       "password file is root's (`sudo aiportal image publish-site ...`; the site_images role "
                       "runs it)")
    settings = Settings.load(require_secrets=False)
    try:
        account = pwd.getpwnam(settings.image_builder_user)
    except KeyError:
        raise CliError("the image builder account %r does not exist: it owns the image cache (the common role "
                       "creates it)" % settings.image_builder_user) from None
    definitions = Path(args.definitions) if args.definitions else Path(containers.__file__).parent / "definitions"
    try:
        catalogue = parse_catalogue(Path(args.catalogue).read_text(), definitions)
    except OSError as e:
        raise CliError("cannot read the catalogue %s: %s" % (args.catalogue, e.strerror)) from e
    except ValueError as e:
        raise CliError("%s: %s" % (args.catalogue, e)) from e
    registry = args.registry or settings.site_registry
    cache_root = Path(args.cache or settings.image_cache)
    publisher = SitePublisher(
        registry=registry, user=args.user or settings.site_registry_user,
        password_file=Path(args.password_file or settings.site_registry_password_file),
        cache=SifCache(cache_root), base_dir=Path(args.base_dir or Path(settings.shared_root, "images", "base")),
        insecure=args.insecure or registry in settings.registry_insecure, ca_file=Path(settings.registry_ca_file),
        seed=_seed_as(account, cache_root, args.timeout), workdir=Path(args.workdir), timeout=args.timeout,
        progress=_say)
    images_file = Path(args.images_file or settings.site_images_file)
    try:
        report = publisher.run(catalogue, images_file, jobs=args.jobs)
    except (ContainerError, ValueError) as e:
        from portal.cli.convert import _failed
        raise _failed(e) from e
    for line in report.changes:
        print("changed: %s" % line)
    for p in report.published:
        print("%s %s@%s %s" % (p.image.name, p.ref, p.digest, p.sif))
    return 0


def add_publish_site_parser(isub) -> None:
    """``aiportal image publish-site`` under the ``image`` command's subparsers."""
    c = isub.add_parser("publish-site", help="(root; the site_images role) build the site's base images, publish "
                                             "them under site/ in the site registry, seed the SIF cache, write "
                                             "site_images_file")
    c.add_argument("--catalogue", required=True, metavar="FILE",
                   help="JSON list of images: name, definition, tag, title, description, framework, build_args, cmd")
    c.add_argument("--definitions", metavar="DIR", help="where relative definitions are (default: the installed "
                                                         "containers/definitions)")
    c.add_argument("--jobs", type=int, default=3, help="images built and published at once (default 3)")
    c.add_argument("--registry", help="HOST[:PORT] (default: site_registry)")
    c.add_argument("--insecure", action="store_true", help="plain HTTP (default: when registry_insecure names it)")
    c.add_argument("--user", help="the registry account (default: site_registry_user)")
    c.add_argument("--password-file", help="its password (default: site_registry_password_file)")
    c.add_argument("--cache", help="the SIF cache (default: image_cache)")
    c.add_argument("--base-dir", help="where built SIFs are kept (default: SHARED_ROOT/images/base)")
    c.add_argument("--images-file", help="the list to write (default: site_images_file)")
    c.add_argument("--workdir", default="/var/tmp", help="node-local scratch for the OCI conversion (default /var/tmp)")
    c.add_argument("--timeout", type=float, default=1800.0, help="seconds per build or push (default 1800)")
    c.add_argument("-v", "--verbose", action="store_true", help="log every command")
    c.set_defaults(func=cmd_image_publish_site)
