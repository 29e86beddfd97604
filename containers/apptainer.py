"""Pure argv builders for apptainer (and the one skopeo copy the image builder needs).

Every function returns a list of strings for ``subprocess.run(argv)`` or for the job-script
renderer to ``shlex.join``; nothing here runs a command or makes shell text.

Two things learnt on apptainer 1.4.5 that shape these argvs:

* Without ``--no-eval`` apptainer passes ``--env`` values through a shell (``$(id)`` in a value
  runs ``id`` in the container) and, for images converted from OCI/Docker, ``instance run``
  and ``run`` ``eval`` the arguments too (``a"; touch /tmp/X; "`` creates /tmp/X). Every
  exec/instance argv therefore carries ``--no-eval``: values and arguments arrive verbatim,
  and ``$VAR`` in an ``--env`` value is not expanded. The image's own ``%environment`` (for
  example a venv on PATH) still applies.
* ``--env`` is a pflag StringToString: an item with one ``=`` loses trailing double quotes, an
  item with more is read as CSV (commas split it). :func:`env_item` quotes CSV-style when the
  value has ``=``; values it cannot carry (trailing ``"`` without ``=``, CRLF, NUL) are refused.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence

#: ``--mksquashfs-args`` value: zstd level 3 builds 3-6x faster than the default gzip at about
#: the same size (labs: 44 MB image, 3-6 s instead of 11-22 s).
ZSTD_MKSQUASHFS_ARGS = "-comp zstd -Xcompression-level 3"

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
BIND_MODES = frozenset({"ro", "rw"})

Bind = tuple[str, str, str]


def exec_argv(sif, command: Sequence[str], binds: Iterable[Bind] = (), nv: bool = False,
              env: Mapping[str, str] | None = None, cleanenv: bool = True,
              pwd: str | None = None, apptainer: str = "apptainer") -> list[str]:
    """``apptainer exec`` of ``command`` (an argv list) in the image ``sif``.

    ``binds`` are ``(host_path, container_path, "ro"|"rw")``; ``nv`` adds ``--nv`` (pass it only
    when the node has an NVIDIA driver: without one apptainer silently ignores it); ``env`` goes
    in as ``--env K=V`` items; ``cleanenv`` keeps the caller's environment out; ``pwd`` is the
    working directory inside the container. Raises ValueError naming a bad bind, key or value.
    """
    argv = [apptainer, "exec", "--no-eval"]
    if cleanenv:
        argv.append("--cleanenv")
    argv += _common_flags(binds, nv, env)
    if pwd is not None:
        if not os.path.isabs(pwd) or "\n" in pwd:
            raise ValueError("pwd %r must be an absolute path inside the container" % (pwd,))
        argv += ["--pwd", pwd]
    return argv + [_image_path(sif)] + _command(command)


def instance_run_argv(sif, instance_name: str, command: Sequence[str] = (),
                      binds: Iterable[Bind] = (), nv: bool = False,
                      env: Mapping[str, str] | None = None, apptainer: str = "apptainer",
                      cleanenv: bool = True) -> list[str]:
    """``apptainer instance run``: start ``instance_name`` running the image's runscript with
    ``command`` as its arguments (for images converted from Docker, the arguments replace CMD).
    Use this rather than ``instance start`` for images whose service is a Docker CMD."""
    if not isinstance(instance_name, str) or not _INSTANCE_NAME.fullmatch(instance_name):
        raise ValueError("instance name %r is not valid: 1-63 letters, digits, '_', '.', '-', "
                         "starting with a letter or digit" % (instance_name,))
    argv = [apptainer, "instance", "run", "--no-eval"]
    if cleanenv:
        argv.append("--cleanenv")
    argv += _common_flags(binds, nv, env)
    return argv + [_image_path(sif), instance_name] + _command(command, allow_empty=True)


def build_argv(dest, source_ref_string: str, zstd: bool = True, force: bool = True,
               apptainer: str = "apptainer") -> list[str]:
    """``apptainer build DEST SOURCE``; SOURCE as apptainer reads it (``docker-archive:/x.tar``,
    ``oci-archive:/x.tar``, ``/x.def``, ``/x.sif``). ``zstd`` compresses with zstd level 3."""
    argv = [apptainer, "build"]
    if force:
        argv.append("--force")
    if zstd:
        argv += ["--mksquashfs-args", ZSTD_MKSQUASHFS_ARGS]
    return argv + [_image_path(dest), _arg(source_ref_string, "source")]


def skopeo_copy_argv(source: str, dest: str, skopeo: str = "skopeo") -> list[str]:
    """``skopeo copy SOURCE DEST`` (for example an OCI layout to an oci-archive, which apptainer
    reads more reliably than ``oci:DIR:TAG``)."""
    return [skopeo, "copy", "-q", _arg(source, "source"), _arg(dest, "destination")]


def env_item(key: str, value: str) -> str:
    """One ``--env`` item that apptainer turns back into exactly ``key=value``.

    Raises ValueError naming the key when it is not a shell identifier (apptainer drops every
    variable after such a key) or the value cannot be carried by ``--env``.
    """
    if not isinstance(key, str) or not _ENV_KEY.fullmatch(key):
        raise ValueError("environment variable name %r is not a shell identifier "
                         "([A-Za-z_][A-Za-z0-9_]*)" % (key,))
    if not isinstance(value, str):
        raise ValueError("environment variable %s: value %r is not a string" % (key, value))
    if "\0" in value:
        raise ValueError("environment variable %s: value contains a NUL byte" % key)
    if "\r\n" in value:
        raise ValueError("environment variable %s: apptainer turns CRLF into LF; use LF or pass "
                         "the text in a file" % key)
    item = "%s=%s" % (key, value)
    if "=" in value:
        return '"%s"' % item.replace('"', '""')
    if value.endswith('"'):
        raise ValueError("environment variable %s: apptainer's --env strips a trailing double "
                         "quote from a value without '='; pass the text in a file" % key)
    return item


def _common_flags(binds: Iterable[Bind], nv: bool, env: Mapping[str, str] | None) -> list[str]:
    out: list[str] = []
    for bind in binds:
        out += ["--bind", bind_spec(*bind)]
    if nv:
        out.append("--nv")
    for key, value in (env or {}).items():
        out += ["--env", env_item(key, value)]
    return out


def bind_spec(src, dst, mode: str = "rw") -> str:
    """``SRC:DST:MODE`` for ``--bind``; both paths absolute, without ``:`` or ``,`` (the
    separators of apptainer's bind syntax)."""
    for what, path in (("source", str(src)), ("destination", str(dst))):
        if not os.path.isabs(path):
            raise ValueError("bind %s %r must be an absolute path" % (what, path))
        if any(c in path for c in ":,\n\0"):
            raise ValueError("bind %s %r contains ':', ',' or a newline, which apptainer's "
                             "--bind syntax cannot carry; rename it" % (what, path))
    if mode not in BIND_MODES:
        raise ValueError("bind mode %r is not one of %s" % (mode, ", ".join(sorted(BIND_MODES))))
    return "%s:%s:%s" % (src, dst, mode)


def _image_path(sif) -> str:
    path = str(sif)
    if not os.path.isabs(path):
        raise ValueError("image path %r must be absolute" % path)
    return _arg(path, "image path")


def _command(command: Sequence[str], allow_empty: bool = False) -> list[str]:
    if isinstance(command, (str, bytes)):
        raise ValueError("command must be an argv list, not the string %r" % (command,))
    argv = [_arg(a, "command argument") for a in command]
    if not argv and not allow_empty:
        raise ValueError("command is empty")
    return argv


def _arg(value, what: str) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError("%s %r is not a string" % (what, value))
    value = str(value)
    if "\0" in value:
        raise ValueError("%s %r contains a NUL byte" % (what, value))
    return value
