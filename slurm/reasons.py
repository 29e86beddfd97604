"""Why a job waits (or ended): Slurm's reason codes become one plain-English sentence, once, here.

``squeue`` prints a job's reason in ``%r`` (and ``scontrol show job`` in ``Reason=``): a code
from Slurm's table (``src/common/job_state_reason.c``, ``job_state_reason_string``) such as
``Resources`` or ``AssocGrpGRES``, sometimes in parentheses, sometimes followed by details
(``ReqNodeNotAvail, UnavailableNodes:g1n1``), and sometimes a sentence that slurmctld wrote
instead (``launch failed requeued held``). :func:`explain` takes any of these forms and returns a
:class:`Reason`: Slurm's code, a sentence a researcher understands, and a :class:`Category`.
A code this table does not know (a newer Slurm) is shown as Slurm's own words, never dropped.

Pure: no Slurm command runs here.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

__all__ = ["Category", "Reason", "REASONS", "explain", "dependency_failed"]


class Category(enum.Enum):
    NONE = "none"                #: no reason: running, or not yet looked at by the scheduler
    QUEUE = "queue"              #: waiting its turn (priority, begin time, scheduler passes)
    RESOURCES = "resources"      #: waiting for free nodes, GPUs, licenses
    DEPENDENCY = "dependency"    #: waiting for (or blocked by) another job
    LIMIT = "limit"              #: an account (project), QOS or array limit holds it back
    HELD = "held"                #: held by its owner, an admin or Slurm: needs a release
    NODE = "node"                #: the nodes it needs are down, drained or reserved
    PARTITION = "partition"      #: its partition is down, inactive or too small for it
    RESERVATION = "reservation"  #: waiting for, or broken by, a reservation
    CONFIG = "config"            #: the request can never run as asked (account, QOS, constraints)
    FAILURE = "failure"          #: why a finished job ended (exit code, time limit, memory)
    OTHER = "other"              #: a code this table does not know


@dataclass(frozen=True)
class Reason:
    code: str           #: Slurm's code as Slurm spells it (the text itself when unknown)
    sentence: str       #: what it means for the researcher, and what to do where they can act
    category: Category
    detail: str = ""    #: what Slurm printed after the code, e.g. ``UnavailableNodes:g1n1``


# -- codes that are not account/QOS limits --------------------------------------------------------

_C = Category
_PLAIN: tuple[tuple[str, Category, str], ...] = (
    ("None", _C.NONE, "no reason given: the job is running, or the scheduler has not looked at it yet"),
    ("Prolog", _C.QUEUE, "its nodes are running their start-up script (prolog); it starts in a moment"),
    ("Priority", _C.QUEUE, "jobs with a higher priority are ahead of it in the queue"),
    ("Resources", _C.RESOURCES, "waiting for a free node of this type"),
    ("Dependency", _C.DEPENDENCY, "waiting for the job it depends on (e.g. its image conversion) to finish"),
    ("DependencyNeverSatisfied", _C.DEPENDENCY,
     "a job it depends on ended without success, so this job can never start: the portal cancels it; "
     "fix what failed and submit again"),
    ("BeginTime", _C.QUEUE,
     "waiting for its start time (a job requeued after a node failure waits about two minutes here)"),
    ("JobHeldUser", _C.HELD, "held by its owner: release it (`scontrol release JOBID`) to let it start"),
    ("JobHeldAdmin", _C.HELD, "held by a cluster administrator: ask them to release it"),
    ("JobHoldMaxRequeue", _C.HELD,
     "held after being requeued too many times: look at its log, then submit again or ask an admin to release it"),
    ("Licenses", _C.RESOURCES, "waiting for a free license"),
    ("Reservation", _C.RESERVATION, "waiting for its reservation to start"),
    ("ReservationDeleted", _C.RESERVATION,
     "the reservation it asked for was deleted: cancel it and submit again without that reservation"),
    ("ReservationInvalid", _C.RESERVATION,
     "the reservation it asked for is not valid (no such reservation, or not open to you)"),
    ("ReqNodeNotAvail", _C.NODE, "the nodes it needs are down, drained or reserved: waits until they are back"),
    ("NodeDown", _C.NODE, "a node it needs is down: waits until it is back"),
    ("FrontEndDown", _C.NODE, "no front-end node is up to launch it: waits until one is back"),
    ("MaxPoweredUpNodes", _C.NODE, "waiting until the cluster may power up another node for it"),
    ("PartitionDown", _C.PARTITION, "its partition is down: waits until an admin brings it up again"),
    ("PartitionInactive", _C.PARTITION, "its partition does not start jobs right now: waits until an admin reopens it"),
    ("PartitionNodeLimit", _C.PARTITION,
     "it asks for more nodes than its partition allows one job (or fewer than its minimum): ask for a size the "
     "partition allows"),
    ("PartitionTimeLimit", _C.PARTITION,
     "its time limit is longer than its partition allows: ask for less time"),
    ("PartitionConfig", _C.PARTITION, "its partition's settings do not allow this job as asked"),
    ("BadConstraints", _C.CONFIG,
     "no node of this type can ever give what it asked for (GPUs, CPUs, memory or features): it will not start; "
     "ask for less"),
    ("Constraints", _C.CONFIG, "the node features it asked for (--constraint) cannot be met: it will not start as asked"),
    ("QOSNotAllowed", _C.CONFIG, "its QOS may not be used in this partition or by your project"),
    ("AccountNotAllowed", _C.CONFIG, "your project (Slurm account) may not use this partition"),
    ("InvalidAccount", _C.CONFIG, "its Slurm account is not valid (no such account, or you are not a member)"),
    ("InvalidQOS", _C.CONFIG, "its QOS is not valid for your project"),
    ("MaxMemPerLimit", _C.CONFIG,
     "it asks for more memory per CPU or per node than its partition allows: ask for less memory"),
    ("Cleaning", _C.QUEUE, "Slurm is still cleaning up its previous run (after a requeue); it starts once that is done"),
    ("SchedDefer", _C.QUEUE, "the scheduler put it off to its next pass"),
    ("FedJobLock", _C.QUEUE, "waiting for the clusters of the federation to agree where it runs"),
    ("BurstBufferResources", _C.RESOURCES, "waiting for free burst-buffer space"),
    ("BurstBufferStageIn", _C.RESOURCES, "waiting for its burst-buffer data to be staged in"),
    ("MpiPortsBusy", _C.RESOURCES, "waiting for free MPI ports on its nodes"),
    ("PowerNotAvail", _C.RESOURCES, "waiting until the cluster has the power to run it"),
    ("PowerReserved", _C.RESOURCES, "waiting: the power it needs is reserved for other jobs"),
    ("JobArrayTaskLimit", _C.LIMIT, "its array already runs as many tasks at once as its %N limit allows"),
    ("AccountingPolicy", _C.LIMIT, "an account (project) or QOS limit holds it back: waits until the limit allows it"),
    ("AssociationJobLimit", _C.LIMIT,
     "your project has as many jobs running as its limit allows: waits until one of them ends"),
    ("AssociationResourceLimit", _C.LIMIT,
     "your project is at its resource limit (CPUs, GPUs, memory or nodes): waits until its other jobs free some"),
    ("AssociationTimeLimit", _C.LIMIT, "your project has used up its time allowance: ask an admin"),
    ("QOSJobLimit", _C.LIMIT, "its QOS has as many jobs running as its limit allows: waits until one of them ends"),
    ("QOSResourceLimit", _C.LIMIT, "its QOS is at its resource limit: waits until other jobs free some"),
    ("QOSTimeLimit", _C.LIMIT, "its QOS has used up its time allowance: ask an admin"),
    ("QOSUsageThreshold", _C.LIMIT,
     "your project's past usage is above its QOS's usage threshold: waits until the usage decays"),
    # why a finished job ended (squeue and sacct show them for finished jobs)
    ("NonZeroExitCode", _C.FAILURE, "its command exited with a non-zero exit code: see its log"),
    ("RaisedSignal", _C.FAILURE, "its command was killed by a signal: see its log"),
    ("TimeLimit", _C.FAILURE, "it ran out of its time limit: ask for more time, or checkpoint and resume"),
    ("OutOfMemory", _C.FAILURE, "it ran out of memory: ask for more memory"),
    ("JobLaunchFailure", _C.FAILURE, "Slurm could not launch it on its node: submit again; tell an admin if it repeats"),
    ("SystemFailure", _C.FAILURE, "a node or Slurm failure ended it: submit again"),
    ("InactiveLimit", _C.FAILURE, "it ended after being inactive longer than the cluster allows"),
    ("DeadLine", _C.FAILURE, "it could not finish before its deadline (--deadline)"),
    ("BurstBufferOperation", _C.FAILURE, "a burst-buffer operation failed for it"),
)

# Sentences slurmctld writes instead of a code (its state_desc); matched at the start, case-insensitively.
_PHRASES: tuple[tuple[str, Category, str], ...] = (
    ("launch failed requeued held", _C.HELD,
     "it failed to start on its node, so Slurm put it back in the queue on hold: look at its log, then release "
     "it (`scontrol release JOBID`) or submit again"),
    ("job requeued in held state", _C.HELD,
     "it was put back in the queue on hold: release it (`scontrol release JOBID`) to let it start"),
    ("Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions", _C.NODE,
     "the nodes it can run on are down, drained or reserved for jobs of higher-priority partitions: waits until "
     "they are back"),
    ("Requested node configuration is not available", _C.CONFIG,
     "no node of this type can ever give what it asked for (GPUs, CPUs, memory or features): it will not start; "
     "ask for less"),
    ("Job's QOS not permitted to use this partition", _C.CONFIG,
     "its QOS may not be used in this partition"),
    ("Job's account not permitted to use this partition", _C.CONFIG,
     "your project (Slurm account) may not use this partition"),
)


# -- account (association) and QOS limits --------------------------------------------------------

# Every limit code of Slurm's table; each is worded by _limit_sentence from its parts. A new code
# that does not parse stops the import (tests import this module), so none is silently generic.
_LIMIT_CODES: tuple[str, ...] = (
    # association ("your project"): group totals
    "AssocGrpCpuLimit", "AssocGrpCPUMinutesLimit", "AssocGrpCPURunMinutesLimit", "AssocGrpJobsLimit",
    "AssocGrpMemLimit", "AssocGrpMemMinutes", "AssocGrpMemRunMinutes", "AssocGrpNodeLimit", "AssocGrpNodeMinutes",
    "AssocGrpNodeRunMinutes", "AssocGrpSubmitJobsLimit", "AssocGrpWallLimit", "AssocGrpGRES", "AssocGrpGRESMinutes",
    "AssocGrpGRESRunMinutes", "AssocGrpBilling", "AssocGrpBillingMinutes", "AssocGrpBillingRunMinutes",
    "AssocGrpEnergy", "AssocGrpEnergyMinutes", "AssocGrpEnergyRunMinutes", "AssocGrpLicense",
    "AssocGrpLicenseMinutes", "AssocGrpLicenseRunMinutes", "AssocGrpBB", "AssocGrpBBMinutes", "AssocGrpBBRunMinutes",
    "AssocGrpUnknown", "AssocGrpUnknownMinutes", "AssocGrpUnknownRunMinutes",
    # association: per job, per node, per user
    "AssocMaxJobsLimit", "AssocMaxSubmitJobLimit", "AssocMaxCpuPerJobLimit", "AssocMaxCpuMinutesPerJobLimit",
    "AssocMaxCpuPerNode", "AssocMaxNodePerJobLimit", "AssocMaxNodeMinutesPerJob", "AssocMaxWallDurationPerJobLimit",
    "AssocMaxMemPerJob", "AssocMaxMemPerNode", "AssocMaxMemMinutesPerJob", "AssocMaxGRESPerJob",
    "AssocMaxGRESPerNode", "AssocMaxGRESMinutesPerJob", "AssocMaxBillingPerJob", "AssocMaxBillingPerNode",
    "AssocMaxBillingMinutesPerJob", "AssocMaxEnergyPerJob", "AssocMaxEnergyPerNode", "AssocMaxEnergyMinutesPerJob",
    "AssocMaxLicensePerJob", "AssocMaxLicenseMinutesPerJob", "AssocMaxBBPerJob", "AssocMaxBBPerNode",
    "AssocMaxBBMinutesPerJob", "AssocMaxUnknownPerJob", "AssocMaxUnknownPerNode", "AssocMaxUnknownMinutesPerJob",
    # QOS: group totals
    "QOSGrpCpuLimit", "QOSGrpCPUMinutesLimit", "QOSGrpCPURunMinutesLimit", "QOSGrpJobsLimit", "QOSGrpMemLimit",
    "QOSGrpMemoryMinutes", "QOSGrpMemoryRunMinutes", "QOSGrpNodeLimit", "QOSGrpNodeMinutes", "QOSGrpNodeRunMinutes",
    "QOSGrpSubmitJobsLimit", "QOSGrpWallLimit", "QOSGrpGRES", "QOSGrpGRESMinutes", "QOSGrpGRESRunMinutes",
    "QOSGrpBilling", "QOSGrpBillingMinutes", "QOSGrpBillingRunMinutes", "QOSGrpEnergy", "QOSGrpEnergyMinutes",
    "QOSGrpEnergyRunMinutes", "QOSGrpLicense", "QOSGrpLicenseMinutes", "QOSGrpLicenseRunMinutes", "QOSGrpBB",
    "QOSGrpBBMinutes", "QOSGrpBBRunMinutes", "QOSGrpUnknown", "QOSGrpUnknownMinutes", "QOSGrpUnknownRunMinutes",
    # QOS: per job, per node, per user, minimums
    "QOSMaxCpuPerJobLimit", "QOSMaxCpuMinutesPerJobLimit", "QOSMaxCpuPerNode", "QOSMaxCpuPerUserLimit",
    "QOSMaxNodePerJobLimit", "QOSMaxNodeMinutesPerJob", "QOSMaxNodePerUserLimit", "QOSMaxWallDurationPerJobLimit",
    "QOSMaxJobsPerUserLimit", "QOSMaxSubmitJobPerUserLimit", "QOSMaxMemoryPerJob", "QOSMaxMemoryPerNode",
    "QOSMaxMemoryPerUser", "QOSMaxMemoryMinutesPerJob", "QOSMaxGRESPerJob", "QOSMaxGRESPerNode", "QOSMaxGRESPerUser",
    "QOSMaxGRESMinutesPerJob", "QOSMaxBillingPerJob", "QOSMaxBillingPerNode", "QOSMaxBillingPerUser",
    "QOSMaxBillingMinutesPerJob", "QOSMaxEnergyPerJob", "QOSMaxEnergyPerNode", "QOSMaxEnergyPerUser",
    "QOSMaxEnergyMinutesPerJob", "QOSMaxLicensePerJob", "QOSMaxLicensePerUser", "QOSMaxLicenseMinutesPerJob",
    "QOSMaxBBPerJob", "QOSMaxBBPerNode", "QOSMaxBBPerUser", "QOSMaxUnknownPerJob", "QOSMaxUnknownPerNode",
    "QOSMaxUnknownPerUser", "QOSMaxUnknownMinutesPerJob",
    "QOSMinCpuNotSatisfied", "QOSMinMemory", "QOSMinNode", "QOSMinGRES", "QOSMinBilling", "QOSMinEnergy",
    "QOSMinLicense", "QOSMinBB", "QOSMinUnknown",
    # QOS: per account (project) and per user, running totals
    "MaxJobsPerAccount", "MaxSubmitJobsPerAccount", "MaxCpuPerAccount", "MaxNodePerAccount", "MaxMemoryPerAccount",
    "MaxGRESPerAccount", "MaxBillingPerAccount", "MaxEnergyPerAccount", "MaxLicensePerAccount", "MaxBBPerAccount",
    "MaxUnknownPerAccount", "MaxCpuRunMinsPerAccount", "MaxNodeRunMinsPerAccount", "MaxMemoryRunMinsPerAccount",
    "MaxGRESRunMinsPerAccount", "MaxBillingRunMinsPerAccount", "MaxEnergyRunMinsPerAccount",
    "MaxLicenseRunMinsPerAccount", "MaxBBRunMinsPerAccount", "MaxUnknownRunMinsPerAccount",
    "MaxCpuRunMinsPerUser", "MaxNodeRunMinsPerUser", "MaxMemoryRunMinsPerUser", "MaxGRESRunMinsPerUser",
    "MaxBillingRunMinsPerUser", "MaxEnergyRunMinsPerUser", "MaxLicenseRunMinsPerUser", "MaxBBRunMinsPerUser",
    "MaxUnknownRunMinsPerUser",
)

_LIMIT_RE = re.compile(
    r"^(?P<scope>Assoc|QOS)?(?P<kind>Grp|Max|Min)"
    r"(?P<res>Cpu|CPU|Memory|Mem|Node|GRES|Billing|Energy|License|BB|Unknown|SubmitJobs|SubmitJob|Jobs"
    r"|WallDuration|Wall)"
    r"(?P<measure>RunMinutes|RunMins|Minutes)?(?:Per(?P<per>Job|Node|User|Account))?(?:Limit|NotSatisfied)?$")

#: resource word in Slurm's code -> (as in "its GPU limit", as in "more GPUs", "fewer" or "less")
_RESOURCE = {
    "Cpu": ("CPU", "CPUs", "fewer"), "CPU": ("CPU", "CPUs", "fewer"), "Mem": ("memory", "memory", "less"),
    "Memory": ("memory", "memory", "less"), "Node": ("node", "nodes", "fewer"), "GRES": ("GPU", "GPUs", "fewer"),
    "Billing": ("billing", "billing units", "fewer"), "Energy": ("energy", "energy", "less"),
    "License": ("license", "licenses", "fewer"), "BB": ("burst-buffer", "burst-buffer space", "less"),
    "Unknown": ("resource", "resources", "fewer"),
}


def _limit_sentence(code: str) -> str:
    m = _LIMIT_RE.match(code)
    if not m:
        raise ValueError("slurm.reasons: limit code %r does not parse; word it in _PLAIN instead" % code)
    scope, kind, res, measure, per = m.group("scope", "kind", "res", "measure", "per")
    qos = scope != "Assoc"
    group = "its QOS (all its users together)" if qos else "your project"
    group_jobs = "the running jobs of its QOS" if qos else "your project's running jobs"
    one_job = "its QOS" if qos else "your project"
    if res in ("Jobs", "SubmitJobs", "SubmitJob"):
        what = "jobs running" if res == "Jobs" else "jobs queued or running"
        until = "one of them ends" if res == "Jobs" else "one of them leaves the queue"
        if kind == "Grp":
            who = "%s has" % group
        elif per == "User":
            who, what = "you have", what + " as its QOS allows one user"
        elif per == "Account":
            who, what = "your project has", what + " as its QOS allows one project"
        elif per is None and not qos:
            who, what = "you have", what + " in this project"
        else:
            raise ValueError("slurm.reasons: job-count limit %r has no wording" % code)
        if " allows " not in what:
            what += " as " + ("its limit allows" if kind == "Grp" else "you may")
        return "%s as many %s: this one waits until %s" % (who, what, until)
    if res in ("Wall", "WallDuration"):
        if kind == "Grp":
            return "%s has used up its wall-clock time allowance: waits until past usage decays" % group
        return "its time limit is longer than %s allows one job: it will not start; ask for less time" % one_job
    adj, plural, fewer = _RESOURCE[res]
    minutes = "%s-minutes (%s × time)" % (adj, plural)
    if kind == "Min":
        return "it asks for %s %s than its QOS requires: it will not start; ask for more" % (fewer, plural)
    if kind == "Grp":
        if measure is None:
            return "%s is at its %s limit: waits until running jobs free some %s" % (group, adj, plural)
        if measure == "Minutes":
            return "%s has used up its %s allowance: waits until past usage decays" % (group, minutes)
        return "%s already hold as many %s as allowed: waits until some of them finish" % (group_jobs, minutes)
    if per == "Job":
        if measure is None:
            return ("it asks for more %s than %s allows one job: it will not start; ask for %s"
                    % (plural, one_job, fewer))
        return ("it asks for more %s than %s allows one job: it will not start; ask for less time or %s %s"
                % (minutes, one_job, fewer, plural))
    if per == "Node":
        return ("it asks for more %s per node than %s allows: it will not start; ask for %s per node"
                % (plural, one_job, fewer))
    if per in ("User", "Account"):
        holder, poss = ("you are", "your") if per == "User" else ("your project is", "your project's")
        if measure is None:
            return ("%s at %s %s limit in its QOS: waits until other jobs free some %s"
                    % (holder, "your" if per == "User" else "its", adj, plural))
        return ("%s running jobs already hold as many %s as its QOS allows one %s: waits until some of them finish"
                % (poss, minutes, "user" if per == "User" else "project"))
    raise ValueError("slurm.reasons: limit code %r has no wording" % code)


def _table() -> dict[str, Reason]:
    rows = [Reason(code, sentence, cat) for code, cat, sentence in _PLAIN]
    rows += [Reason(code, _limit_sentence(code), Category.LIMIT) for code in _LIMIT_CODES]
    table: dict[str, Reason] = {}
    for r in rows:
        key = r.code.casefold()
        if key in table:
            raise ValueError("slurm.reasons: code %r is in the table twice" % r.code)
        table[key] = r
    return table


_TABLE = _table()
#: every code this module knows, by Slurm's spelling
REASONS: Mapping[str, Reason] = MappingProxyType({r.code: r for r in _TABLE.values()})
_PHRASE_ROWS = tuple((p.casefold(), Reason(p, s, c)) for p, c, s in _PHRASES)


# -- a job that can never start because a job it depends on failed ---------------------------------

_DEPENDENCY_FAILED = "a job it depends on "
#: the longest reason a job stores (its column's size)
MAX_REASON = 1024


def dependency_failed(job_id: str, why: str = "", what: str = "") -> str:
    """Why a job whose dependency can never be met was ended (Slurm's DependencyNeverSatisfied),
    in words: ``a job it depends on (655) ended without success: FAILED with exit code 1``.

    ``job_id`` is that job ("" where Slurm did not say which), ``what`` names it where it is known
    (``its image conversion``), ``why`` says how it ended (for a conversion, the conversion's own
    error). At most :data:`MAX_REASON` characters: ``why`` is cut to fit. :func:`explain` reads
    the result back as DependencyNeverSatisfied."""
    named = "(%s%s) " % (job_id, ", " + what if what else "") if job_id else ""
    head = "%s%sended without success" % (_DEPENDENCY_FAILED, named)
    why = " ".join(why.split())
    if not why:
        return head[:MAX_REASON]
    room = MAX_REASON - len(head) - 2
    if len(why) > room:
        why = why[:max(0, room - 3)].rstrip() + "..."
    return "%s: %s" % (head, why)


def explain(text: str | None) -> Reason:
    """What Slurm's reason ``text`` (squeue ``%r``, scontrol ``Reason=``) means.

    Accepts the forms Slurm prints: ``Resources``, ``(Resources)``, any case, ``None`` or empty
    (no reason), a code with details after a comma (``ReqNodeNotAvail, UnavailableNodes:g1n1``,
    kept in :attr:`Reason.detail`), slurmctld's own sentences (``launch failed requeued held``) and
    :func:`dependency_failed`'s (its sentence is the text itself).
    Anything else comes back as ``Reason(text, "Slurm says: <text>", Category.OTHER)``.
    """
    s = " ".join((text or "").split())
    if len(s) >= 2 and s[0] == "(" and s[-1] == ")":
        s = s[1:-1].strip()
    if not s:
        return _TABLE["none"]
    if s.startswith(_DEPENDENCY_FAILED):       # dependency_failed's words: already the sentence
        return Reason("DependencyNeverSatisfied", s, Category.DEPENDENCY)
    folded = s.casefold()
    if folded in _TABLE:
        return _TABLE[folded]
    for phrase, row in _PHRASE_ROWS:
        if folded.startswith(phrase):
            return _with_detail(row, s[len(phrase):])
    head, sep, rest = s.partition(",")
    if sep and head.strip().casefold() in _TABLE:
        return _with_detail(_TABLE[head.strip().casefold()], rest)
    return Reason(s, "Slurm says: %s" % s, Category.OTHER)


def _with_detail(row: Reason, rest: str) -> Reason:
    detail = rest.strip(" ,:;()")
    return Reason(row.code, row.sentence, row.category, detail) if detail else row
