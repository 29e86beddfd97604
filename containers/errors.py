"""Errors raised by the containers package; each carries what is needed to act on it.

The package is a leaf (it imports nothing else of aiportal), so it has its own root,
:class:`ContainerError`; the portal maps ``code`` to ``{"error": code, "message": ...}``.
"""
from __future__ import annotations

import shlex

#: The reference forms :func:`containers.refs.parse_image_ref` accepts, for error messages.
ACCEPTED_FORMS = ("docker://NAME[:TAG|@sha256:DIGEST], docker-archive:/ABS/PATH.tar, "
                  "oci-archive:/ABS/PATH.tar, oci:/ABS/DIR[:TAG], /ABS/PATH.sif, /ABS/PATH.def")


class ContainerError(Exception):
    """Root of the containers package's errors."""

    code = "container_error"


class ImageRefError(ContainerError):
    """An image reference is malformed, unsupported here, or points at nothing usable."""

    code = "invalid_image_ref"

    def __init__(self, ref: str, reason: str):
        self.ref = ref
        self.reason = reason
        super().__init__("invalid image reference %r: %s (accepted forms: %s)"
                         % (ref, reason, ACCEPTED_FORMS))


class ImageBuildError(ContainerError):
    """An image conversion or build failed or timed out (``returncode`` None: timed out).

    Carries argv, exit code, stdout and stderr; the message names the command, the exit code
    and the last line of stderr (apptainer's ``FATAL:`` line), which usually says why.
    """

    code = "image_build_failed"

    def __init__(self, argv, returncode: int | None, stdout: str = "", stderr: str = "",
                 hint: str = ""):
        self.argv = [str(a) for a in argv]
        self.returncode = returncode
        self.stdout = stdout or ""
        self.stderr = stderr or ""
        what = "timed out" if returncode is None else "exited %s" % returncode
        msg = "`%s` %s" % (shlex.join(self.argv), what)
        last = (self.stderr.strip() or self.stdout.strip()).splitlines()
        if last:
            msg += ": %s" % last[-1].strip()
        if hint:
            msg += " (%s)" % hint
        super().__init__(msg)


class CacheError(ContainerError):
    """The SIF cache itself is unusable (bad digest, unwritable root, builder wrote nothing)."""

    code = "image_cache_error"

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__("image cache %s: %s" % (self.path, reason))
