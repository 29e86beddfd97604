"""The Slurm backend on the Slurm command-line tools.

Every command goes through :meth:`SlurmCli._call`: an argv list (never a shell), a timeout
(with slurmctld down, Slurm clients retry for minutes), DEBUG logging of the argv, and a
:class:`SlurmCommandError` carrying argv, exit code, stdout and stderr on failure.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import shlex
import subprocess
from dataclasses import dataclass

import getpass
import re
import time
from typing import Iterable

from slurm.cluster import SEP, Node, Partition, parse_gres_used, parse_sinfo_nodes, sinfo_node_format
from slurm.errors import SlurmCommandError, SubmitError
from slurm.jobs import (SACCT_FIELDS, JobStatus, QueuedJob, parse_sacct, parse_sacct_runs, parse_squeue,
                        parse_squeue_recovery, slurm_time,
                        squeue_format)
from slurm.states import JobState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterView:
    name: str
    partitions: list[Partition]
    nodes: list[Node]

    @property
    def gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    @property
    def gpus_used(self) -> int:
        return sum(n.gpus_used for n in self.nodes)

    def to_dict(self) -> dict:
        return {
            "cluster": self.name,
            "partitions": [p.to_dict() for p in self.partitions],
            "nodes": [n.to_dict() for n in self.nodes],
            "gpus": self.gpus,
            "gpus_used": self.gpus_used,
        }


class SlurmBackend:
    """What aiportal needs from Slurm. :class:`SlurmCli` implements it on the command-line
    tools; a slurmrestd or pyslurm backend would implement the same methods."""

    def submit(self, script: str, user: str | None = None) -> str: raise NotImplementedError
    def statuses(self, job_ids: Iterable[str]) -> dict[str, JobStatus]: raise NotImplementedError
    def array_statuses(self, job_id: str) -> dict[str, JobStatus]: raise NotImplementedError
    def queue(self) -> dict[str, JobStatus]: raise NotImplementedError
    def accounting(self, job_ids: Iterable[str]) -> dict[str, JobStatus]: raise NotImplementedError

    def accounting_runs(self, job_ids: Iterable[str]) -> list[JobStatus]:
        """Every accounting record of these ids, oldest first: each run of a requeued job, and
        older jobs that had the same id (a controller restart that forgot jobs hands their ids
        out again). Backends without that history give their one record per id."""
        return list(self.accounting(job_ids).values())

    def controller_started(self) -> "dt.datetime | None":
        """When the controller last started (a job accepted before then may have been forgotten
        by that restart); None where the backend cannot say."""
        return None

    def cancel(self, job_id: str, user: str | None = None) -> None: raise NotImplementedError
    def requeue(self, job_id: str) -> None: raise NotImplementedError
    def drain(self, node: str, reason: str) -> None: raise NotImplementedError
    def resume(self, node: str) -> None: raise NotImplementedError
    def cluster(self) -> "ClusterView": raise NotImplementedError


_USER_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
_JOB_ID_RE = re.compile(r"^\d+(_\d+)?$")
_NODE_RE = re.compile(r"^[A-Za-z0-9._\-\[\],]+$")


def _check_job_id(job_id: str) -> str:
    if not _JOB_ID_RE.match(str(job_id)):
        raise ValueError("%r is not a Slurm job id (digits, or digits_digits for an array task)" % (job_id,))
    return str(job_id)


class SlurmCli(SlurmBackend):
    """Talks to Slurm through sinfo/squeue/sacct/sbatch/scancel/scontrol (pyslurm is not
    installable for any Slurm version that runs here)."""

    def __init__(self, slurm_conf: str | None = None, timeout: float = 15.0, cluster_name: str = ""):
        self.slurm_conf = slurm_conf
        self.timeout = timeout
        self.cluster_name = cluster_name

    def _as_user(self, user: str | None) -> list[str]:
        """argv prefix that runs a command as ``user``: never submit as root on a user's behalf."""
        if user is None or user == getpass.getuser():
            return []
        if not _USER_RE.match(user):
            raise ValueError("%r is not a Unix user name" % (user,))
        if os.geteuid() != 0:
            raise PermissionError("only root can act as another user (%s); run the portal as root "
                                  "or submit as %s yourself" % (user, getpass.getuser()))
        return ["runuser", "-u", user, "--"]

    def _call(self, argv: list[str], stdin: str | None = None, error=SlurmCommandError) -> str:
        env = dict(os.environ)
        if self.slurm_conf:
            env["SLURM_CONF"] = self.slurm_conf
        log.debug("run %s", shlex.join(argv))
        try:
            # cwd "/": the caller's folder may not be visible to the user we run as
            res = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                 timeout=self.timeout, env=env, check=False, cwd="/")
        except subprocess.TimeoutExpired as e:
            raise SlurmCommandError(argv, None, e.stdout or "", e.stderr or "",
                                    hint="is slurmctld running? `scontrol ping`") from e
        except FileNotFoundError as e:
            raise SlurmCommandError(argv, 127, "", str(e),
                                    hint="Slurm client tools are not installed; run `make run`") from e
        if res.returncode != 0:
            raise error(argv, res.returncode, res.stdout, res.stderr)
        return res.stdout

    def submit(self, script: str, user: str | None = None) -> str:
        """Submit a batch script (sent on stdin) as ``user``; returns the Slurm job id.

        A refused submission always raises :class:`SubmitError` with sbatch's message.
        """
        if user == "root" or (user is None and os.geteuid() == 0):
            raise SubmitError(["sbatch"], None, "", "", hint="aiportal never submits jobs as root: "
                              "pass the Unix user the job belongs to")
        argv = self._as_user(user) + ["sbatch", "--parsable"]
        out = self._call(argv, stdin=script, error=SubmitError).strip()
        job_id = out.split(";")[0]
        if not job_id.isdigit():
            raise SubmitError(argv, 0, out, "", hint="sbatch printed no job id")
        log.info("submitted job %s as %s", job_id, user or getpass.getuser())
        return job_id

    def statuses(self, job_ids: Iterable[str]) -> dict[str, JobStatus]:
        """Status of many jobs in at most two calls: squeue for live jobs, sacct for the rest.

        Ids not found anywhere are left out (Slurm forgot them, or accounting is off).
        """
        wanted = [_check_job_id(j) for j in job_ids]
        if not wanted:
            return {}
        live = self._squeue_all()
        # finished jobs stay in squeue for MinJobAge, without their exit code: ask sacct
        found = {j: live[j] for j in wanted if j in live and not live[j].state.terminal}
        rest = [j for j in wanted if j not in found]
        if rest:
            done = self._sacct(rest)
            found.update({j: done.get(j) or live[j] for j in rest if j in done or j in live})
        return found

    def queue(self) -> dict[str, JobStatus]:
        """Every job Slurm still holds, all users, array tasks one per line, with Slurm's restart
        counts: one squeue call."""
        return self._squeue_all()

    def accounting(self, job_ids: Iterable[str]) -> dict[str, JobStatus]:
        """Accounting records of these jobs (array tasks as ``ID_N``): one sacct call."""
        wanted = [_check_job_id(j) for j in job_ids]
        return self._sacct(wanted) if wanted else {}

    def accounting_runs(self, job_ids: Iterable[str]) -> list[JobStatus]:
        """Every record of these ids (``sacct --duplicates``), in one call."""
        wanted = [_check_job_id(j) for j in job_ids]
        if not wanted:
            return []
        return parse_sacct_runs(self._call(["sacct", "--noheader", "--allocations", "--parsable2", "--duplicates",
                                            "--delimiter", SEP, "--allusers", "--starttime", "now-30days",
                                            "--format", ",".join(SACCT_FIELDS), "--jobs", ",".join(wanted)]))

    def controller_started(self) -> dt.datetime | None:
        """slurmctld's BOOT_TIME (``scontrol show config``)."""
        for line in self._call(["scontrol", "show", "config"]).splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "BOOT_TIME":
                return slurm_time(value)
        return None

    def _squeue_all(self) -> dict[str, JobStatus]:
        """Every job Slurm still holds (array tasks one per line; finished ones too, for
        MinJobAge), in one call."""
        return parse_squeue(self._call(["squeue", "--noheader", "--array", "--states=all",
                                        "--Format", squeue_format()]))

    def _sacct(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """Accounting records of finished jobs (the last run of a requeued job wins), in one call."""
        return parse_sacct(self._call(["sacct", "--noheader", "--allocations", "--parsable2",
                                       "--delimiter", SEP, "--allusers", "--starttime", "now-30days",
                                       "--format", ",".join(SACCT_FIELDS), "--jobs", ",".join(job_ids)]))

    def array_statuses(self, job_id: str) -> dict[str, JobStatus]:
        """Every task of an array job (``ID_N`` -> status), in two calls like :meth:`statuses`."""
        prefix = _check_job_id(job_id) + "_"
        tasks = {k: v for k, v in self._squeue_all().items() if k.startswith(prefix) and not v.state.terminal}
        for k, v in self._sacct([job_id]).items():
            if k.startswith(prefix) and "[" not in k and k not in tasks:
                tasks[k] = v
        return tasks

    def cancel(self, job_id: str, user: str | None = None) -> None:
        """Cancel as ``user`` (Slurm itself refuses other users' jobs), or as the caller."""
        self._call(self._as_user(user) + ["scancel", _check_job_id(job_id)])

    def requeue(self, job_id: str, settle_timeout: float = 30.0) -> None:
        """Requeue and let it start again at once: Slurm holds a requeued job back with a
        begin time of about two minutes; that hold is cleared once the job is PENDING and the
        nodes of its last run have finished cleaning up after it (released earlier, the job can
        start on the same node before slurmd forgot the old run, and Slurm kills it: "Job
        credential revoked")."""
        job_id = _check_job_id(job_id)
        last = self.statuses([job_id]).get(job_id)
        self._call(["scontrol", "requeue", job_id])
        deadline = time.monotonic() + settle_timeout
        while time.monotonic() < deadline:
            st = self.statuses([job_id]).get(job_id)
            if st and st.state is JobState.PENDING and not (last and last.nodes and self._completing(last.nodes)):
                self._call(["scontrol", "update", "jobid=%s" % job_id, "StartTime=now"])
                log.info("requeued job %s without delay", job_id)
                return
            time.sleep(0.1)
        raise SlurmCommandError(["scontrol", "requeue", job_id], 0, "", "",
                                hint="job did not become PENDING within %.0fs" % settle_timeout)

    def _completing(self, nodes: str) -> bool:
        """Whether any of ``nodes`` (a Slurm node list) is still cleaning up after a job."""
        if not _NODE_RE.match(nodes):
            return False
        return "completing" in self._call(["sinfo", "--noheader", "--Node", "--nodes", nodes, "--format", "%T"])

    def drain(self, node: str, reason: str) -> None:
        if not _NODE_RE.match(node) or not reason.strip() or "\n" in reason:
            raise ValueError("drain needs a node name and a one-line reason, got %r, %r" % (node, reason))
        self._call(["scontrol", "update", "nodename=%s" % node, "state=drain", "reason=%s" % reason])

    def resume(self, node: str) -> None:
        if not _NODE_RE.match(node):
            raise ValueError("%r is not a node name" % (node,))
        self._call(["scontrol", "update", "nodename=%s" % node, "state=resume"])

    def node(self, name: str) -> Node | None:
        """One node's state, reason and configured GPUs (one sinfo call); None if unknown."""
        if not _NODE_RE.match(name) or "," in name or "[" in name:
            raise ValueError("%r is not a node name" % (name,))
        nodes, _ = parse_sinfo_nodes(self._call(["sinfo", "--noheader", "--Node", "--nodes", name,
                                                 "--format", sinfo_node_format()]))
        return next((n for n in nodes if n.name == name), None)

    def recovery_jobs(self, job_ids: Iterable[str] | None = None) -> dict[str, QueuedJob]:
        """Every job Slurm holds (or only ``job_ids``) with its restart count, requeue flag and
        begin time, in one call."""
        argv = ["squeue", "--noheader", "--array", "--Format", squeue_format()]
        if job_ids is not None:
            ids = [_check_job_id(j) for j in job_ids]
            if not ids:
                return {}
            argv += ["--jobs", ",".join(ids)]
        return parse_squeue_recovery(self._call(argv))

    def release(self, job_id: str, held: bool = False) -> None:
        """Clear the begin-time hold Slurm puts on a requeued job: it may start at once; ``held``:
        also the hold Slurm puts on a job whose launch failed (``scontrol release``)."""
        if held:
            self._call(["scontrol", "release", _check_job_id(job_id)])
        self._call(["scontrol", "update", "jobid=%s" % _check_job_id(job_id), "StartTime=now"])

    def requeue_now(self, job_id: str) -> None:
        """``scontrol requeue`` without waiting (the caller releases the hold once PENDING)."""
        self._call(["scontrol", "requeue", _check_job_id(job_id)])

    def signal_batch(self, job_id: str, signal_name: str = "TERM") -> None:
        """Signal only the batch shell of a job (``scancel --batch``): the rendered script traps
        TERM, passes it to the program, then stages out; children are not signalled."""
        if not re.match(r"^[A-Z0-9]+$", signal_name):
            raise ValueError("%r is not a signal name such as TERM" % (signal_name,))
        self._call(["scancel", "--batch", "--signal=%s" % signal_name, _check_job_id(job_id)])

    def max_array_size(self) -> int:
        for line in self._call(["scontrol", "show", "config"]).splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "MaxArraySize":
                return int(value.strip())
        return 1001  # Slurm's default

    def cluster(self) -> ClusterView:
        """Partitions and nodes with state, reasons and GPUs, in two sinfo calls."""
        text = self._call(["sinfo", "--noheader", "--Node", "--format", sinfo_node_format()])
        used = self._call(["sinfo", "--noheader", "--Node", "--Format",
                           "NodeList:0%s,GresUsed:0" % SEP])
        nodes, partitions = parse_sinfo_nodes(text, parse_gres_used(used))
        return ClusterView(self.cluster_name, partitions, nodes)
