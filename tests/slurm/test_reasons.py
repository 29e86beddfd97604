"""Slurm's reason codes as a researcher reads them: exact rows for the forms squeue prints, the
completeness of the table against Slurm's own list, and the real squeue of the dev cluster."""
import subprocess

import pytest

from slurm.reasons import MAX_REASON, REASONS, Category, Reason, dependency_failed, explain

NONE = Reason("None", "no reason given: the job is running, or the scheduler has not looked at it yet", Category.NONE)
RESOURCES = Reason("Resources", "waiting for a free node of this type", Category.RESOURCES)
REQ_NODE = "the nodes it needs are down, drained or reserved: waits until they are back"


@pytest.mark.parametrize("text,want", [
    # the forms squeue prints: bare, in parentheses (%R), any case, padded
    ("Resources", RESOURCES),
    ("(Resources)", RESOURCES),
    ("resources", RESOURCES),
    ("  RESOURCES \n", RESOURCES),
    ("( Resources )", RESOURCES),
    # no reason at all
    ("None", NONE), ("(None)", NONE), ("", NONE), ("   ", NONE), ("()", NONE), (None, NONE),
    ("Priority", Reason("Priority", "jobs with a higher priority are ahead of it in the queue", Category.QUEUE)),
    ("Dependency", Reason("Dependency", "waiting for the job it depends on (e.g. its image conversion) to finish",
                          Category.DEPENDENCY)),
    ("(DependencyNeverSatisfied)", Reason(
        "DependencyNeverSatisfied", "a job it depends on ended without success, so this job can never start: the "
        "portal cancels it; fix what failed and submit again", Category.DEPENDENCY)),
    ("BeginTime", Reason("BeginTime", "waiting for its start time (a job requeued after a node failure waits about "
                         "two minutes here)", Category.QUEUE)),
    ("JobHeldUser", Reason("JobHeldUser", "held by its owner: release it (`scontrol release JOBID`) to let it start",
                           Category.HELD)),
    ("JobHeldAdmin", Reason("JobHeldAdmin", "held by a cluster administrator: ask them to release it", Category.HELD)),
    # a code with details after a comma: the details are kept apart
    ("ReqNodeNotAvail, UnavailableNodes:g1n1", Reason("ReqNodeNotAvail", REQ_NODE, Category.NODE,
                                                      "UnavailableNodes:g1n1")),
    ("(ReqNodeNotAvail, UnavailableNodes:g1n[1-2],g4n1)", Reason("ReqNodeNotAvail", REQ_NODE, Category.NODE,
                                                                 "UnavailableNodes:g1n[1-2],g4n1")),
    ("ReqNodeNotAvail, Reserved for maintenance", Reason("ReqNodeNotAvail", REQ_NODE, Category.NODE,
                                                         "Reserved for maintenance")),
    ("ReqNodeNotAvail", Reason("ReqNodeNotAvail", REQ_NODE, Category.NODE)),
    ("ReqNodeNotAvail,", Reason("ReqNodeNotAvail", REQ_NODE, Category.NODE)),
    # slurmctld's own sentences instead of a code
    ("launch failed requeued held", Reason(
        "launch failed requeued held", "it failed to start on its node, so Slurm put it back in the queue on hold: "
        "look at its log, then release it (`scontrol release JOBID`) or submit again", Category.HELD)),
    ("(Launch failed requeued held)", Reason(
        "launch failed requeued held", "it failed to start on its node, so Slurm put it back in the queue on hold: "
        "look at its log, then release it (`scontrol release JOBID`) or submit again", Category.HELD)),
    ("(Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions)", Reason(
        "Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions",
        "the nodes it can run on are down, drained or reserved for jobs of higher-priority partitions: waits until "
        "they are back", Category.NODE)),
    ("Job's QOS not permitted to use this partition (gpu-4card allows normal not big)", Reason(
        "Job's QOS not permitted to use this partition", "its QOS may not be used in this partition", Category.CONFIG,
        "gpu-4card allows normal not big")),
    ("PartitionDown", Reason("PartitionDown", "its partition is down: waits until an admin brings it up again",
                             Category.PARTITION)),
    ("PartitionTimeLimit", Reason("PartitionTimeLimit", "its time limit is longer than its partition allows: ask for "
                                  "less time", Category.PARTITION)),
    ("Reservation", Reason("Reservation", "waiting for its reservation to start", Category.RESERVATION)),
    ("BadConstraints", Reason("BadConstraints", "no node of this type can ever give what it asked for (GPUs, CPUs, "
                              "memory or features): it will not start; ask for less", Category.CONFIG)),
    # account (project) and QOS limits, worded from their parts
    ("AssocGrpGRES", Reason("AssocGrpGRES", "your project is at its GPU limit: waits until running jobs free some GPUs",
                            Category.LIMIT)),
    ("(AssocGrpGRESRunMinutes)", Reason(
        "AssocGrpGRESRunMinutes", "your project's running jobs already hold as many GPU-minutes (GPUs × time) as "
        "allowed: waits until some of them finish", Category.LIMIT)),
    ("AssocGrpBillingMinutes", Reason(
        "AssocGrpBillingMinutes", "your project has used up its billing-minutes (billing units × time) allowance: "
        "waits until past usage decays", Category.LIMIT)),
    ("AssocGrpJobsLimit", Reason("AssocGrpJobsLimit", "your project has as many jobs running as its limit allows: "
                                 "this one waits until one of them ends", Category.LIMIT)),
    ("AssocMaxJobsLimit", Reason("AssocMaxJobsLimit", "you have as many jobs running in this project as you may: "
                                 "this one waits until one of them ends", Category.LIMIT)),
    ("AssocMaxGRESPerJob", Reason("AssocMaxGRESPerJob", "it asks for more GPUs than your project allows one job: it "
                                  "will not start; ask for fewer", Category.LIMIT)),
    ("AssocMaxMemPerNode", Reason("AssocMaxMemPerNode", "it asks for more memory per node than your project allows: "
                                  "it will not start; ask for less per node", Category.LIMIT)),
    ("AssocMaxWallDurationPerJobLimit", Reason(
        "AssocMaxWallDurationPerJobLimit", "its time limit is longer than your project allows one job: it will not "
        "start; ask for less time", Category.LIMIT)),
    ("QOSGrpGRES", Reason("QOSGrpGRES", "its QOS (all its users together) is at its GPU limit: waits until running "
                          "jobs free some GPUs", Category.LIMIT)),
    ("QOSMaxGRESPerUser", Reason("QOSMaxGRESPerUser", "you are at your GPU limit in its QOS: waits until other jobs "
                                 "free some GPUs", Category.LIMIT)),
    ("QOSMaxJobsPerUserLimit", Reason("QOSMaxJobsPerUserLimit", "you have as many jobs running as its QOS allows one "
                                      "user: this one waits until one of them ends", Category.LIMIT)),
    ("QOSMaxSubmitJobPerUserLimit", Reason(
        "QOSMaxSubmitJobPerUserLimit", "you have as many jobs queued or running as its QOS allows one user: this one "
        "waits until one of them leaves the queue", Category.LIMIT)),
    ("QOSGrpCpuLimit", Reason("QOSGrpCpuLimit", "its QOS (all its users together) is at its CPU limit: waits until "
                              "running jobs free some CPUs", Category.LIMIT)),
    ("QOSMinMemory", Reason("QOSMinMemory", "it asks for less memory than its QOS requires: it will not start; ask "
                            "for more", Category.LIMIT)),
    ("QOSMaxGRESMinutesPerJob", Reason(
        "QOSMaxGRESMinutesPerJob", "it asks for more GPU-minutes (GPUs × time) than its QOS allows one job: it will "
        "not start; ask for less time or fewer GPUs", Category.LIMIT)),
    ("MaxJobsPerAccount", Reason("MaxJobsPerAccount", "your project has as many jobs running as its QOS allows one "
                                 "project: this one waits until one of them ends", Category.LIMIT)),
    ("MaxGRESPerAccount", Reason("MaxGRESPerAccount", "your project is at its GPU limit in its QOS: waits until other "
                                 "jobs free some GPUs", Category.LIMIT)),
    ("MaxGRESRunMinsPerUser", Reason(
        "MaxGRESRunMinsPerUser", "your running jobs already hold as many GPU-minutes (GPUs × time) as its QOS allows "
        "one user: waits until some of them finish", Category.LIMIT)),
    ("QOSUsageThreshold", Reason("QOSUsageThreshold", "your project's past usage is above its QOS's usage threshold: "
                                 "waits until the usage decays", Category.LIMIT)),
    # why a finished job ended
    ("OutOfMemory", Reason("OutOfMemory", "it ran out of memory: ask for more memory", Category.FAILURE)),
    # unknown codes and odd text: Slurm's own words, whitespace collapsed, never dropped
    ("SomeFutureReason", Reason("SomeFutureReason", "Slurm says: SomeFutureReason", Category.OTHER)),
    ("(SomeFutureReason)", Reason("SomeFutureReason", "Slurm says: SomeFutureReason", Category.OTHER)),
    ("InvalidReason", Reason("InvalidReason", "Slurm says: InvalidReason", Category.OTHER)),
    ("Weird, thing", Reason("Weird, thing", "Slurm says: Weird, thing", Category.OTHER)),
    ("two\nlines  here", Reason("two lines here", "Slurm says: two lines here", Category.OTHER)),
    ("(", Reason("(", "Slurm says: (", Category.OTHER)),
    ("Resources)", Reason("Resources)", "Slurm says: Resources)", Category.OTHER)),
    ("QOSMaxFooPerUser", Reason("QOSMaxFooPerUser", "Slurm says: QOSMaxFooPerUser", Category.OTHER)),
])
def test_explain(text, want):
    assert explain(text) == want


# Slurm's table (src/common/job_state_reason.c, job_state_reason_string), the codes squeue prints
SLURM_CODES = """
None Prolog Priority Dependency Resources PartitionNodeLimit PartitionTimeLimit PartitionDown PartitionInactive
JobHeldAdmin JobHeldUser BeginTime Licenses AssociationJobLimit AssociationResourceLimit AssociationTimeLimit
Reservation ReqNodeNotAvail FrontEndDown SchedDefer NodeDown BadConstraints SystemFailure JobLaunchFailure
NonZeroExitCode RaisedSignal TimeLimit InactiveLimit InvalidAccount InvalidQOS QOSUsageThreshold QOSJobLimit
QOSResourceLimit QOSTimeLimit Cleaning QOSNotAllowed AccountNotAllowed DependencyNeverSatisfied QOSGrpCpuLimit
QOSGrpCPUMinutesLimit QOSGrpCPURunMinutesLimit QOSGrpJobsLimit QOSGrpMemLimit QOSGrpNodeLimit QOSGrpSubmitJobsLimit
QOSGrpWallLimit QOSMaxCpuPerJobLimit QOSMaxCpuMinutesPerJobLimit QOSMaxNodePerJobLimit QOSMaxWallDurationPerJobLimit
QOSMaxCpuPerUserLimit QOSMaxJobsPerUserLimit QOSMaxNodePerUserLimit QOSMaxSubmitJobPerUserLimit QOSMinCpuNotSatisfied
AssocGrpCpuLimit AssocGrpCPUMinutesLimit AssocGrpCPURunMinutesLimit AssocGrpJobsLimit AssocGrpMemLimit
AssocGrpNodeLimit AssocGrpSubmitJobsLimit AssocGrpWallLimit AssocMaxJobsLimit AssocMaxCpuPerJobLimit
AssocMaxCpuMinutesPerJobLimit AssocMaxNodePerJobLimit AssocMaxWallDurationPerJobLimit AssocMaxSubmitJobLimit
JobHoldMaxRequeue JobArrayTaskLimit BurstBufferResources BurstBufferStageIn BurstBufferOperation AssocGrpUnknown
AssocGrpUnknownMinutes AssocGrpUnknownRunMinutes AssocMaxUnknownPerJob AssocMaxUnknownPerNode
AssocMaxUnknownMinutesPerJob AssocMaxCpuPerNode AssocGrpMemMinutes AssocGrpMemRunMinutes AssocMaxMemPerJob
AssocMaxMemPerNode AssocMaxMemMinutesPerJob AssocGrpNodeMinutes AssocGrpNodeRunMinutes AssocMaxNodeMinutesPerJob
AssocGrpEnergy AssocGrpEnergyMinutes AssocGrpEnergyRunMinutes AssocMaxEnergyPerJob AssocMaxEnergyPerNode
AssocMaxEnergyMinutesPerJob AssocGrpGRES AssocGrpGRESMinutes AssocGrpGRESRunMinutes AssocMaxGRESPerJob
AssocMaxGRESPerNode AssocMaxGRESMinutesPerJob AssocGrpLicense AssocGrpLicenseMinutes AssocGrpLicenseRunMinutes
AssocMaxLicensePerJob AssocMaxLicenseMinutesPerJob AssocGrpBB AssocGrpBBMinutes AssocGrpBBRunMinutes AssocMaxBBPerJob
AssocMaxBBPerNode AssocMaxBBMinutesPerJob QOSGrpUnknown QOSGrpUnknownMinutes QOSGrpUnknownRunMinutes
QOSMaxUnknownPerJob QOSMaxUnknownPerNode QOSMaxUnknownPerUser QOSMaxUnknownMinutesPerJob QOSMinUnknown
QOSMaxCpuPerNode QOSGrpMemoryMinutes QOSGrpMemoryRunMinutes QOSMaxMemoryPerJob QOSMaxMemoryPerNode
QOSMaxMemoryPerUser QOSMaxMemoryMinutesPerJob QOSMinMemory QOSGrpNodeMinutes QOSGrpNodeRunMinutes
QOSMaxNodeMinutesPerJob QOSMinNode QOSGrpEnergy QOSGrpEnergyMinutes QOSGrpEnergyRunMinutes QOSMaxEnergyPerJob
QOSMaxEnergyPerNode QOSMaxEnergyPerUser QOSMaxEnergyMinutesPerJob QOSMinEnergy QOSGrpGRES QOSGrpGRESMinutes
QOSGrpGRESRunMinutes QOSMaxGRESPerJob QOSMaxGRESPerNode QOSMaxGRESPerUser QOSMaxGRESMinutesPerJob QOSMinGRES
QOSGrpLicense QOSGrpLicenseMinutes QOSGrpLicenseRunMinutes QOSMaxLicensePerJob QOSMaxLicensePerUser
QOSMaxLicenseMinutesPerJob QOSMinLicense QOSGrpBB QOSGrpBBMinutes QOSGrpBBRunMinutes QOSMaxBBPerJob QOSMaxBBPerNode
QOSMaxBBPerUser QOSMinBB DeadLine MaxBBPerAccount MaxCpuPerAccount MaxEnergyPerAccount MaxGRESPerAccount
MaxNodePerAccount MaxLicensePerAccount MaxMemoryPerAccount MaxUnknownPerAccount MaxJobsPerAccount
MaxSubmitJobsPerAccount PartitionConfig AccountingPolicy FedJobLock OutOfMemory MaxMemPerLimit AssocGrpBilling
AssocGrpBillingMinutes AssocGrpBillingRunMinutes AssocMaxBillingPerJob AssocMaxBillingPerNode
AssocMaxBillingMinutesPerJob QOSGrpBilling QOSGrpBillingMinutes QOSGrpBillingRunMinutes QOSMaxBillingPerJob
QOSMaxBillingPerNode QOSMaxBillingPerUser QOSMaxBillingMinutesPerJob MaxBillingPerAccount QOSMinBilling
ReservationDeleted ReservationInvalid Constraints MaxBBRunMinsPerAccount MaxBillingRunMinsPerAccount
MaxCpuRunMinsPerAccount MaxEnergyRunMinsPerAccount MaxGRESRunMinsPerAccount MaxNodeRunMinsPerAccount
MaxLicenseRunMinsPerAccount MaxMemoryRunMinsPerAccount MaxUnknownRunMinsPerAccount MaxBBRunMinsPerUser
MaxBillingRunMinsPerUser MaxCpuRunMinsPerUser MaxEnergyRunMinsPerUser MaxGRESRunMinsPerUser MaxNodeRunMinsPerUser
MaxLicenseRunMinsPerUser MaxMemoryRunMinsPerUser MaxUnknownRunMinsPerUser MaxPoweredUpNodes MpiPortsBusy
""".split()


@pytest.mark.parametrize("code", SLURM_CODES)
def test_every_slurm_code_has_its_own_row(code):
    r = explain(code)
    assert r.code == code and r is REASONS[code]
    assert r.category is not Category.OTHER and not r.sentence.startswith("Slurm says")
    assert explain("(%s)" % code.upper()) is r


def test_the_table_holds_only_slurms_codes():
    older = {"PowerNotAvail", "PowerReserved"}     # removed from Slurm, still printed by older releases
    assert set(REASONS) == set(SLURM_CODES) | older


def test_sentences_are_one_line_and_each_code_has_its_own():
    assert all("\n" not in r.sentence and r.sentence == r.sentence.strip() for r in REASONS.values())
    sentences = [r.sentence for r in REASONS.values()]
    assert len(set(sentences)) == len(sentences)


@pytest.mark.slurm
def test_real_squeue_reasons_are_explained(slurm):
    """The reasons squeue prints on the dev cluster for a held job, an admin-held job, a job waiting on
    a dependency and one waiting for its begin time."""
    script = "#!/bin/bash\ntrue\n"
    held = slurm.sbatch(script, "--hold", "--time=1")
    admin = slurm.sbatch(script, "--time=1", "--begin=now+3600")
    subprocess.run(["scontrol", "hold", admin.id], check=True, capture_output=True, timeout=15)
    dep = slurm.sbatch(script, "--time=1", "--dependency=afterok:%s" % held.id)
    later = slurm.sbatch(script, "--time=1", "--begin=now+3600")
    out = subprocess.run(["squeue", "-h", "-j", ",".join(j.id for j in (held, admin, dep, later)), "-o", "%i|%r"],
                         check=True, capture_output=True, text=True, timeout=15).stdout
    got = {jid: explain(reason) for jid, reason in (line.split("|", 1) for line in out.splitlines())}
    assert (got[held.id].code, got[held.id].category) == ("JobHeldUser", Category.HELD)
    assert (got[admin.id].code, got[admin.id].category) == ("JobHeldAdmin", Category.HELD)
    assert (got[dep.id].code, got[dep.id].category) == ("Dependency", Category.DEPENDENCY)
    assert (got[later.id].code, got[later.id].category) == ("BeginTime", Category.QUEUE)


@pytest.mark.parametrize("args, text", [
    (("655",), "a job it depends on (655) ended without success"),
    (("655", "FAILED with exit code 1"), "a job it depends on (655) ended without success: FAILED with exit code 1"),
    (("655", "CANCELLED"), "a job it depends on (655) ended without success: CANCELLED"),
    (("655", "While performing build: conveyor failed to get: unexpected EOF", "its image conversion"),
     "a job it depends on (655, its image conversion) ended without success: While performing build: conveyor "
     "failed to get: unexpected EOF"),
    (("655", "  two\nlines  "), "a job it depends on (655) ended without success: two lines"),
    (("",), "a job it depends on ended without success"),
])
def test_dependency_failed_words(args, text):
    assert dependency_failed(*args) == text


def test_dependency_failed_reads_back_as_its_own_sentence_in_the_dependency_category():
    text = dependency_failed("655", "FATAL stuff", "its image conversion")
    assert explain(text) == Reason("DependencyNeverSatisfied", text, Category.DEPENDENCY)
    assert explain(dependency_failed("")).code == "DependencyNeverSatisfied"


@pytest.mark.parametrize("length", [MAX_REASON - 80, MAX_REASON, MAX_REASON + 1, 5000])
def test_dependency_failed_fits_the_reason_column(length):
    text = dependency_failed("655", "x" * length, "its image conversion")
    assert len(text) <= MAX_REASON
    assert text.startswith("a job it depends on (655, its image conversion) ended without success: xxx")
    assert text.endswith("...") == (len("a job it depends on (655, its image conversion) ended without success: ")
                                    + length > MAX_REASON)
