"""Errors raised by the slurm package; each carries what is needed to act on it."""
from __future__ import annotations

import shlex


class SlurmError(Exception):
    """Root of the slurm package's errors."""

    code = "slurm_error"


class SlurmCommandError(SlurmError):
    """A Slurm command failed or timed out. Carries argv, exit code, stdout and stderr."""

    code = "slurm_unavailable"

    def __init__(self, argv, returncode, stdout="", stderr="", hint=""):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        what = "timed out" if returncode is None else "exited %s" % returncode
        msg = "`%s` %s" % (shlex.join(self.argv), what)
        if stderr.strip():
            msg += ": %s" % stderr.strip().splitlines()[-1]
        if hint:
            msg += " (%s)" % hint
        super().__init__(msg)

    @property
    def controller_down(self) -> bool:
        """The controller did not answer (or timed out): the request may be tried again later,
        unlike a refusal (bad partition, too many GPUs)."""
        text = (self.stderr or "").lower()
        return self.returncode is None or any(p in text for p in _CONTROLLER_DOWN)


#: what Slurm's commands print when the controller cannot be reached (nothing was decided)
_CONTROLLER_DOWN = ("unable to contact slurm controller", "socket timed out", "temporarily unable to accept job",
                    "connection refused", "zero bytes were transmitted or received", "slurm_persist_conn_open",
                    "unexpected missing socket error", "communication connection failure", "connection reset",
                    "transport endpoint is not connected")


class SlurmParseError(SlurmError):
    """Slurm printed something the parser does not understand."""

    code = "slurm_parse_error"

    def __init__(self, line, reason):
        self.line = line
        super().__init__("cannot parse Slurm output %r: %s" % (line, reason))


class SpecError(SlurmError):
    """A job specification field is invalid: names the field, the value and the fix."""

    code = "invalid_spec"

    def __init__(self, field, value, reason):
        self.field = field
        self.value = value
        super().__init__("%s %r: %s" % (field, value, reason))


class SubmitError(SlurmCommandError):
    """sbatch refused the job (bad partition, too many GPUs, ...) or could not be run."""

    code = "submit_failed"
