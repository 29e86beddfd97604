"""Pure argv builders for apptainer (and the one skopeo copy the image builder needs).

Every function returns a list of strings for ``subprocess.run(argv)``, or (:func:`job_exec_prefix`)
the words of a batch job's container argv for the job-script renderer to quote; nothing here
runs a command or makes shell text. This is the one place that chooses apptainer's flags: the
batch script (through ``JobSpec.container``), the health probe and the services use it.

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
from typing import Union

#: ``--mksquashfs-args`` value: zstd level 3 builds 3-6x faster than the default gzip at about
#: the same size (labs: 44 MB image, 3-6 s instead of 11-22 s).
ZSTD_MKSQUASHFS_ARGS = "-comp zstd -Xcompression-level 3"

_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_MOUNT_NAME = re.compile(r"[a-z][a-z-]*|/[^,\n\0]*")
BIND_MODES = frozenset({"ro", "rw"})

Bind = tuple[str, str, str]


def exec_argv(sif, command: Sequence[str], binds: Iterable[Bind] = (), nv: bool = False,
              env: Mapping[str, str] | None = None, cleanenv: bool = True,
              pwd: str | None = None, apptainer: str = "apptainer", contain: bool = False,
              no_home: bool = False, no_mount: Sequence[str] = (), silent: bool = False) -> list[str]:
    """``apptainer exec`` of ``command`` (an argv list) in the image ``sif``: exactly
    ``exec_prefix(...) + [sif, *command]``; the arguments are :func:`exec_prefix`'s."""
    prefix = exec_prefix(binds, nv=nv, env=env, cleanenv=cleanenv, pwd=pwd, apptainer=apptainer,
                         contain=contain, no_home=no_home, no_mount=no_mount, silent=silent)
    return prefix + [_image_path(sif)] + _command(command)


def exec_prefix(binds: Iterable[Bind] = (), nv: bool = False, env: Mapping[str, str] | None = None,
                cleanenv: bool = True, pwd: str | None = None, apptainer: str = "apptainer",
                contain: bool = False, no_home: bool = False, no_mount: Sequence[str] = (),
                silent: bool = False) -> list[str]:
    """``apptainer exec`` up to the image: the image path and the command follow it.

    ``binds`` are ``(host_path, container_path, "ro"|"rw")``; ``nv`` adds ``--nv`` (apptainer
    1.4.5 ignores it silently on a node without an NVIDIA driver); ``env`` goes in as ``--env
    K=V`` items; ``cleanenv`` keeps the caller's environment out; ``pwd`` is the working
    directory inside the container; ``contain`` and ``no_home`` leave out the host's /tmp,
    /home and $HOME; ``no_mount`` names mounts apptainer would add (``cwd``, ``tmp``, ...);
    ``silent`` keeps apptainer's INFO and WARNING lines out (errors still show). Raises
    ValueError naming a bad bind, key, value or mount name.
    """
    argv = [apptainer] + (["--silent"] if silent else []) + ["exec", "--no-eval"]
    if cleanenv:
        argv.append("--cleanenv")
    if contain:
        argv.append("--contain")
    if no_home:
        argv.append("--no-home")
    if no_mount:
        argv += ["--no-mount", ",".join(_mount_name(m) for m in no_mount)]
    argv += _common_flags(binds, nv, env)
    if pwd is not None:
        if not isinstance(pwd, str) or not os.path.isabs(pwd) or "\n" in pwd or "\0" in pwd:
            raise ValueError("pwd %r must be an absolute path inside the container" % (pwd,))
        argv += ["--pwd", pwd]
    return argv


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


#: Where a batch job's container sees its staged-in data and its outputs (the platform's contract).
DATA_IN_CONTAINER = "/data/data"
OUTPUT_IN_CONTAINER = "/data/output"
#: A word of a job's container argv: a string, or a tuple of parts that make one word, where a
#: part that is not a string is a run-time value of the batch script (``slurm.spec.JOB_DATA_DIR``,
#: ``JOB_OUTPUT_DIR``) that only the script renderer turns into shell text.
JobWord = Union[str, tuple]


def job_exec_prefix(data_dir, output_dir, *, nv: bool = False, binds: Iterable[Bind] = (),
                    apptainer: str = "apptainer") -> tuple[JobWord, ...]:
    """The ``apptainer exec`` argv up to the image for a batch job (training or a service
    replica); the batch script runs ``prefix + (image, *command)``.

    ``data_dir`` and ``output_dir`` are bound read-write at /data/data and /data/output. Each is
    a host path or, for a path the batch script knows only when it runs (an array task's
    output folder), the renderer's marker for it (``slurm.spec.JOB_DATA_DIR``,
    ``JOB_OUTPUT_DIR``): its ``--bind`` word is then the tuple ``(marker, ":/data/output:rw")``.
    ``nv`` (give it when the job has GPUs) adds ``--nv``; ``binds`` are more
    ``(host_path, container_path, "ro"|"rw")``.

    The flags, and why they differ from :func:`health_probe_argv`:

    * ``--no-eval``: arguments arrive verbatim (see the module docstring);
    * no ``--cleanenv``: the variables the script exports (the user's, a sweep task's
      parameters) are the program's environment;
    * ``--no-mount cwd``: the job folder (the script's working directory, which holds the
      data-source credentials file) stays out of the container;
    * ``--pwd /data/output``: the program starts in its output folder (relative paths write
      what is staged out); without a ``--pwd`` apptainer cannot enter the unmounted job folder
      and logs "Error changing the container working directory", then uses $HOME;
    * $HOME and /tmp stay mounted, as programs (pip, Keras, matplotlib caches) expect.
    """
    words: list[JobWord] = [*exec_prefix(nv=nv, cleanenv=False, no_mount=("cwd",),
                                         pwd=OUTPUT_IN_CONTAINER, apptainer=apptainer)]
    for src, dst in ((data_dir, DATA_IN_CONTAINER), (output_dir, OUTPUT_IN_CONTAINER)):
        if isinstance(src, (str, os.PathLike)):
            words += ["--bind", bind_spec(src, dst, "rw")]
        elif src is None or isinstance(src, (bytes, int, float, tuple, list)):
            raise ValueError("bind source %r for %s is neither a path nor the batch script's "
                             "marker for one (slurm.spec.JOB_DATA_DIR, JOB_OUTPUT_DIR)" % (src, dst))
        else:
            words += ["--bind", (src, ":%s:rw" % dst)]
    for bind in binds:
        words += ["--bind", bind_spec(*bind)]
    return tuple(words)


def health_probe_argv(sif, apptainer: str = "apptainer") -> list[str]:
    """``apptainer exec`` of ``/bin/true`` in ``sif``: can this node start a container at all?

    Unlike a job it mounts nothing of the host's beyond what apptainer needs (``--contain
    --no-home``, ``--pwd /``), so a hung home or /tmp shows up in its own check and not here;
    ``--cleanenv`` and ``--silent`` keep the caller's environment and apptainer's warnings about
    the minimal image (no passwd file) out. Errors still reach stderr.
    """
    return exec_argv(sif, ["/bin/true"], contain=True, no_home=True, pwd="/", silent=True,
                     apptainer=apptainer)


def build_argv(dest, source_ref_string: str, zstd: bool = True, force: bool = True,
               apptainer: str = "apptainer",
               build_args: Iterable[tuple[str, str]] = ()) -> list[str]:
    """``apptainer build DEST SOURCE``; SOURCE as apptainer reads it (``docker-archive:/x.tar``,
    ``oci-archive:/x.tar``, ``/x.def``, ``/x.sif``). ``zstd`` compresses with zstd level 3.
    ``build_args`` fill a definition's ``%arguments`` (``--build-arg KEY=VALUE``); apptainer
    splits the flag's value at commas, so a value with ``,`` is refused."""
    argv = [apptainer, "build"]
    if force:
        argv.append("--force")
    if zstd:
        argv += ["--mksquashfs-args", ZSTD_MKSQUASHFS_ARGS]
    for key, value in build_args:
        if not isinstance(key, str) or not _ENV_KEY.fullmatch(key):
            raise ValueError("build argument name %r is not an identifier ([A-Za-z_][A-Za-z0-9_]*)" % (key,))
        value = _arg(value, "build argument %s" % key)
        if "," in value or "\n" in value:
            raise ValueError("build argument %s=%r: apptainer splits --build-arg at commas and "
                             "lines; pin one version instead (e.g. torch==2.5.1)" % (key, value))
        argv += ["--build-arg", "%s=%s" % (key, value)]
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


def _mount_name(name) -> str:
    if not isinstance(name, str) or not _MOUNT_NAME.fullmatch(name):
        raise ValueError("--no-mount item %r is not a mount name (cwd, tmp, home, ...) or an "
                         "absolute path without ','" % (name,))
    return name


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
