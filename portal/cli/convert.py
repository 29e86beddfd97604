"""``aiportal image convert``: images into the shared SIF cache, always as the image builder account.

The cache (``image_cache``) belongs to the image builder account (``image_builder_user``,
``aiportal-img``): the portal's conversion jobs run as it, and every file in the cache must be
its own. A conversion run as root would leave root-owned files there (Apptainer's own cache
folders are created 0700), after which every conversion of the builder account fails. So:

* as the builder account: the conversion runs here;
* as root: the command runs itself again as the builder account (``runuser -u BUILDER --``,
  an argv list, the environment without root's Apptainer and temporary-folder settings), after
  making relative paths absolute against the caller's folder. A definition file (``.def``) is
  the exception: its bootstrap (debootstrap: device nodes, files of many owners, chroot) needs
  real root, and the builder account has no subordinate id range for ``--fakeroot`` (it should
  not: every user runs what it writes). Root builds it in a private folder of its own
  (``/var/tmp/aiportal-def-*``, Apptainer's cache and temporary files in there too), then the
  builder account copies the finished SIF into the cache under the definition's digest
  (``--as-digest``), so nothing root-owned ever reaches the cache;
* as anyone else: refused, with the command to run instead.
"""
from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from portal.cli.client import CliError

log = logging.getLogger(__name__)

#: where root builds definitions (large: a few hundred MB; not a tmpfs on most hosts)
DEFINITION_WORKDIR = "/var/tmp"
#: environment variables of the caller that must not reach the builder account's conversion
_DROPPED_PREFIXES = ("APPTAINER_", "SINGULARITY_", "XDG_", "SUDO_")
_DROPPED = frozenset({"TMPDIR", "TMP", "TEMP", "HOME", "USER", "LOGNAME", "MAIL", "SHELL", "OLDPWD", "PWD"})


def builder_env(environ: Mapping[str, str], account: pwd.struct_passwd) -> dict[str, str]:
    """The environment the builder account's conversion runs with: the caller's (PATH, the
    AIPORTAL_ settings, the locale, CA bundles) without root's Apptainer, temporary-folder and
    session settings, with the account's own HOME, USER and LOGNAME."""
    env = {k: v for k, v in environ.items() if k not in _DROPPED and not k.startswith(_DROPPED_PREFIXES)}
    env.update(HOME=account.pw_dir, USER=account.pw_name, LOGNAME=account.pw_name, SHELL="/bin/sh")
    return env


def self_argv() -> list[str]:
    """This very ``aiportal``: the console script beside the interpreter, else the interpreter
    running the CLI's main."""
    script = Path(sys.executable).with_name("aiportal")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "import sys; from portal.cli import main; sys.exit(main())"]


def convert_argv(builder: str, program: list[str], ref: str, cache: str | None = None,
                 authfile: str | None = None, as_digest: str | None = None) -> list[str]:
    """``runuser -u BUILDER -- aiportal image convert REF [...]``: the conversion as the builder
    account (an argv list; ``ref`` and ``cache`` already absolute)."""
    argv = ["runuser", "-u", builder, "--", *program, "image", "convert", ref]
    if cache:
        argv += ["--cache", cache]
    if authfile:
        argv += ["--authfile", authfile]
    if as_digest:
        argv += ["--as-digest", as_digest]
    return argv


def _say(message: str) -> None:
    print("[aiportal image] %s" % message, file=sys.stderr)


#: how many of a failed command's last output lines are shown (a definition's %post, apptainer's errors)
TAIL_LINES = 15


def _failed(e) -> CliError:
    """The CLI's error for a failed conversion; a failed command's last lines of output are
    shown first (they say which step of a %post failed)."""
    from containers.errors import ImageBuildError
    if isinstance(e, ImageBuildError):
        lines = [line for line in (e.stdout + "\n" + e.stderr).splitlines() if line.strip()][-TAIL_LINES:]
        if lines:
            _say("the last lines %s printed:" % Path(e.argv[0]).name)
            for line in lines:
                print("    %s" % line.rstrip(), file=sys.stderr)
    return CliError(str(e))


def cmd_image_convert(args) -> int:
    from containers.errors import ContainerError
    from containers.refs import RefKind, absolute_ref, parse_image_ref
    from portal.settings import Settings
    logging.basicConfig(level=logging.INFO, format="[aiportal image] %(message)s")
    settings = Settings.load(require_secrets=False)
    cwd = os.getcwd()
    cache_root = Path(cwd, args.cache) if args.cache else Path(settings.image_cache)
    ref_text = absolute_ref(args.ref, cwd)
    authfile = Path(cwd, args.authfile) if getattr(args, "authfile", None) else None
    as_digest = getattr(args, "as_digest", None)
    builder = settings.image_builder_user
    try:
        account = pwd.getpwnam(builder)
    except KeyError:
        account = None
    try:
        try:
            ref = parse_image_ref(ref_text)
        except ContainerError as e:
            raise CliError(str(e)) from e
        euid = os.geteuid()
        if account is not None and euid == account.pw_uid:
            return _convert_here(settings, cache_root, ref, authfile, as_digest)
        if euid != 0:
            raise CliError(
                "the image cache %s is written only by %s: run `sudo aiportal image convert %s` (root runs the "
                "conversion as %s) or `sudo -u %s aiportal image convert %s`; jobs submitted through the portal "
                "have their images converted for them" % (cache_root, builder, ref_text, builder, builder, ref_text))
        if account is None:
            raise CliError(
                "the image builder account %r does not exist on this host: conversions run as that account, the "
                "only one that writes the image cache %s; create it (`make provision`: the common role) or name "
                "an existing account in image_builder_user (/etc/aiportal/site.toml)" % (builder, cache_root))
        if as_digest:
            raise CliError("--as-digest is how root hands a SIF it built to %s; run the command without it"
                           % builder)
        cache = str(cache_root) if args.cache else None
        if ref.kind is RefKind.DEFINITION:
            return _build_definition_as_root(settings, cache_root, cache, ref, account)
        if ref.kind is not RefKind.DOCKER:
            _check_readable(account, ref.path, ref_text)
        with _handed_authfile(authfile, account) as handed:
            return _run_as(account, convert_argv(builder, self_argv(), ref_text, cache, handed))
    finally:
        if authfile is not None and os.geteuid() == 0:
            authfile.unlink(missing_ok=True)    # the registry account: read once, never kept


def _convert_here(settings, cache_root: Path, ref, authfile: Path | None, as_digest: str | None) -> int:
    """The conversion itself, as the builder account."""
    from containers.builder import ApptainerBuilder
    from containers.cache import SifCache
    from containers.digests import DIGEST_RE
    from containers.errors import ContainerError
    from containers.refs import RefKind
    if not os.access(cache_root, os.W_OK):
        raise CliError("the image cache %s is not writable by %s, which should own it: repair it with "
                       "`make provision` (the shared_fs role gives the cache to %s)"
                       % (cache_root, settings.image_builder_user, settings.image_builder_user))
    if as_digest is not None and (ref.kind is not RefKind.SIF or not DIGEST_RE.fullmatch(as_digest)):
        raise CliError("--as-digest puts a SIF built elsewhere into the cache: give /PATH.sif and sha256:HEX "
                       "(got %s and %r)" % (ref, as_digest))
    cache = SifCache(cache_root)
    builder = ApptainerBuilder(cache.apptainer_cachedir, cache.apptainer_tmpdir, authfile=authfile,
                               insecure=frozenset(settings.registry_insecure))
    try:
        sif = cache.ensure(ref, builder=builder, progress=_say, digest=as_digest)
    except ContainerError as e:
        hint = ""
        if ref.kind is RefKind.DEFINITION:
            hint = ("; a definition's bootstrap needs root: run `sudo aiportal image convert %s` (root builds it "
                    "in a private folder and hands the image to %s)" % (ref, settings.image_builder_user))
        err = _failed(e)
        raise CliError(str(err) + hint) from e
    finally:
        if authfile is not None:            # the registry account: read once, never kept
            authfile.unlink(missing_ok=True)
    print(sif)
    return 0


def _run_as(account: pwd.struct_passwd, argv: list[str]) -> int:
    """Run ``argv`` (a ``runuser`` line) in ``/`` with :func:`builder_env`; its output goes to
    ours. Returns its exit status."""
    _say("converting as %s" % account.pw_name)
    log.debug("run %s", argv)
    try:
        res = subprocess.run(argv, env=builder_env(os.environ, account), cwd="/", check=False)
    except FileNotFoundError as e:
        raise CliError("cannot run %s (%s): install util-linux's runuser" % (argv[0], e)) from e
    if res.returncode in (126, 127):
        raise CliError("%s cannot run %s (exit status %d): install aiportal where every account can run it "
                       "(the portal's virtualenv, /opt/aiportal/venv, on every user's PATH as /usr/local/bin/aiportal) "
                       "and run that one" % (account.pw_name, argv[4], res.returncode))
    return res.returncode


def _check_readable(account: pwd.struct_passwd, path: Path, ref_text: str) -> None:
    """The builder account must be able to read the image it converts (root can read anything)."""
    test = ["-r", str(path), "-a", "-x", str(path)] if path.is_dir() else ["-r", str(path)]
    res = subprocess.run(["runuser", "-u", account.pw_name, "--", "test", *test], capture_output=True,
                         timeout=30, check=False, cwd="/")
    if res.returncode != 0:
        raise CliError("%s cannot read %s, and conversions run as %s: make it readable (chmod o+r on the file, "
                       "o+x on its folders) or copy it to the shared filesystem, then run `aiportal image convert "
                       "%s` again" % (account.pw_name, path, account.pw_name, ref_text))


class _handed_authfile:
    """A copy of root's registry authfile that only the builder account can read (in a private
    folder of its own), removed with that folder afterwards; None without an authfile."""

    def __init__(self, authfile: Path | None, account: pwd.struct_passwd):
        self.authfile, self.account, self.folder = authfile, account, None

    def __enter__(self) -> str | None:
        if self.authfile is None:
            return None
        try:
            data = self.authfile.read_bytes()
        except OSError as e:
            raise CliError("cannot read the authfile %s: %s" % (self.authfile, e.strerror)) from e
        self.folder = Path(tempfile.mkdtemp(prefix="aiportal-auth-"))
        os.chown(self.folder, self.account.pw_uid, self.account.pw_gid)
        copy = self.folder / "auth.json"
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chown(copy, self.account.pw_uid, self.account.pw_gid)
        return str(copy)

    def __exit__(self, *exc) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _build_definition_as_root(settings, cache_root: Path, cache_arg: str | None, ref,
                              account: pwd.struct_passwd) -> int:
    """Build a definition as root in a private folder, then have the builder account put the SIF
    into the cache under the definition's digest."""
    from containers.builder import ApptainerBuilder
    from containers.cache import SifCache
    from containers.errors import ContainerError
    cache = SifCache(cache_root)
    try:
        hit = cache.lookup(ref)
        if hit is not None:
            _say("cached: %s" % hit)
            print(hit)
            return 0
        digest = cache.digest_of(ref, progress=_say)
    except ContainerError as e:
        raise CliError(str(e)) from e
    work = Path(tempfile.mkdtemp(prefix="aiportal-def-", dir=DEFINITION_WORKDIR))
    try:
        for sub in ("cache", "tmp"):
            (work / sub).mkdir(mode=0o700)
        sif = work / "image.sif"
        _say("building %s as root in %s (a definition's bootstrap needs root); %s then puts the image into the "
             "cache" % (ref, work, account.pw_name))
        try:
            ApptainerBuilder(work / "cache", work / "tmp")(ref, sif)
        except ContainerError as e:
            raise _failed(e) from e
        os.chown(sif, account.pw_uid, account.pw_gid)
        os.chmod(sif, 0o600)
        os.chmod(work, 0o711)           # the builder account reaches image.sif, and nothing else in here
        return _run_as(account, convert_argv(account.pw_name, self_argv(), str(sif), cache_arg, as_digest=digest))
    finally:
        shutil.rmtree(work, ignore_errors=True)
