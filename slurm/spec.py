"""The typed job specification and the node types it is built from.

A :class:`JobSpec` is everything :func:`slurm.render.render_sbatch` needs; it is frozen and
validated on construction, so a spec that exists can be rendered. Node types (``1card``,
``4card``, ``infer``) map to a partition and GRES through a table the caller passes in (from
the portal's settings); this package reads no settings itself.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from slurm.errors import SpecError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TIME_RE = re.compile(r"^(UNLIMITED|\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+|\d+-\d+:\d{2}|\d+-\d+:\d{2}:\d{2})$")
_SIGNAL_RE = re.compile(r"^(B:)?(USR1|USR2|TERM|INT|HUP|URG)(@\d+)?$")
_DEPENDENCY_RE = re.compile(r"^(after|afterok|afternotok|afterany|aftercorr)(:\d+(_\d+)?)+$|^singleton$")
_ARRAY_RE = re.compile(r"^\d+(-\d+)?(:\d+)?(,\d+(-\d+)?(:\d+)?)*(%\d+)?$")
_PLAIN_RE = re.compile(r"^[A-Za-z0-9._,:|&@+=/-]{1,256}$")
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# Environment variables the job's own machinery sets; a user may not override them.
RESERVED_ENV = frozenset({"AIPORTAL_JOB_DIR", "AIPORTAL_JOB_ID", "SLURM_CONF", "PATH", "LD_PRELOAD",
                          "LD_LIBRARY_PATH", "HOME", "USER", "APPTAINERENV_PATH"})


@dataclass(frozen=True)
class ScriptDir:
    """A folder the batch script makes and knows only when it runs; in a container argv
    (:attr:`JobSpec.container`) it stands for that folder's path, which
    :func:`slurm.render.render_sbatch`, and only it, writes as ``"$<var>"``. The script's
    paths come from ``job_dir``, which has no ':', ',' or newline, so they fit a ``--bind``."""

    var: str


#: the staged-in inputs: ``$AIPORTAL_JOB_DIR/data``
JOB_DATA_DIR = ScriptDir("data_dir")
#: the job's outputs: ``$AIPORTAL_JOB_DIR/output``, and ``output/task-N`` for array task N
JOB_OUTPUT_DIR = ScriptDir("out_dir")
SCRIPT_DIRS = frozenset({JOB_DATA_DIR, JOB_OUTPUT_DIR})
_CONTAINER_FIX = ("build it with containers.apptainer.job_exec_prefix(JOB_DATA_DIR, JOB_OUTPUT_DIR, "
                  "nv=gpus > 0): a tuple of argv words up to the image")


def time_limit_seconds(value: str) -> int | None:
    """Seconds of a Slurm time limit (``minutes``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``); None for ``UNLIMITED``. ``value`` must match the accepted forms."""
    if value == "UNLIMITED":
        return None
    days, _, rest = value.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:
        h, m, sec = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + sec
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


#: Slurm may send a ``--signal`` warning up to this much earlier than asked (its event resolution)
SIGNAL_SLACK_S = 60


def warning_fits(signal: str, time_limit: str) -> bool:
    """Whether a checkpoint warning ``signal`` (``B:USR1@120``) leaves a job with ``time_limit``
    time to start its program first: the limit is at least the warning plus Slurm's slack plus as
    much again. A shorter job would get the signal as it starts, before its program could handle
    it (a 2-minute job with ``@120``: killed by USR1 within seconds, its command never run)."""
    limit = time_limit_seconds(time_limit)
    warn = int(signal.rpartition("@")[2]) if "@" in signal else 60     # Slurm's default: 60 s
    return limit is None or limit >= 2 * (warn + SIGNAL_SLACK_S)


def check_job_basics(name: str, partition: str, command, time_limit: str) -> None:
    """What every batch job needs right: its name, partition, command (an argv of strings) and
    time limit. Raises :class:`SpecError` naming the field."""
    if not _NAME_RE.match(name):
        raise SpecError("name", name, "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if not _PLAIN_RE.match(partition):
        raise SpecError("partition", partition, "not a partition name")
    if not command or any(not isinstance(a, str) for a in command):
        raise SpecError("command", command, "give at least the program to run, as strings")
    if any("\0" in a for a in command):
        raise SpecError("command", command, "arguments cannot contain NUL bytes")
    if not _TIME_RE.match(time_limit):
        raise SpecError("time_limit", time_limit, "use minutes, HH:MM:SS, D-HH:MM:SS or UNLIMITED")


def _check_container(container: tuple) -> None:
    if not container:
        raise SpecError("container", container, _CONTAINER_FIX)
    for word in container:
        parts = word if isinstance(word, tuple) else (word,)
        if not parts:
            raise SpecError("container", word, "an empty word; " + _CONTAINER_FIX)
        for part in parts:
            if isinstance(part, str):
                if "\0" in part:
                    raise SpecError("container", word, "argv words cannot contain NUL bytes")
            elif part not in SCRIPT_DIRS:
                raise SpecError("container", word, "%r is neither a string nor one of the script's "
                                                   "folders (JOB_DATA_DIR, JOB_OUTPUT_DIR)" % (part,))


@dataclass(frozen=True)
class NodeType:
    """What a user picks: a partition and what each node gives."""

    name: str
    partition: str
    gpus: int
    gpu_type: str
    cpus: int
    memory_mb: int
    #: write the GPU model into each job's request (``--gres=gpu:TYPE:N``): for a partition with
    #: mixed models where jobs must get this one; by default a job asks for N GPUs of any model
    pin_gpu_type: bool = False


def resolve_node_type(name: str, table: Mapping[str, NodeType]) -> NodeType:
    try:
        return table[name]
    except KeyError:
        raise SpecError("node_type", name, "unknown node type; choose one of %s" % ", ".join(sorted(table))) from None


@dataclass(frozen=True)
class JobSpec:
    """A batch job that runs ``command`` inside ``image`` on ``partition``.

    Paths are as the compute nodes see them (shared filesystem). ``job_dir`` holds ``data/``
    (staged-in inputs) and ``output/`` (restored on requeue and staged out at the end); the
    script runs ``container + (image,) + command``, where ``container`` is the container argv
    up to the image, built by ``containers.apptainer.job_exec_prefix`` with the binds of
    :data:`JOB_DATA_DIR` and :data:`JOB_OUTPUT_DIR`.
    """

    name: str
    partition: str
    image: str
    command: tuple[str, ...]
    job_dir: str
    gpus: int = 0
    gpu_type: str | None = None
    cpus: int = 1
    memory_mb: int | None = None
    time_limit: str = "01:00:00"
    env: tuple[tuple[str, str], ...] = ()
    inputs: tuple[str, ...] = ()
    #: inputs bound (read-only, by ``container``) rather than staged: (host path, container
    #: path), for the script's log
    bound_inputs: tuple[tuple[str, str], ...] = ()
    #: a script for plain sbatch (``aiportal script``): each submission of it runs in
    #: ``job_dir/run-SLURM_JOB_ID`` (data, output, fence), so submitting it twice gives two
    #: folders; ``job_dir`` itself holds only ``logs/`` (``slurm-ID.out`` per submission)
    run_folders: bool = False
    output: str | None = None
    requeue: bool = True
    checkpoint_signal: str | None = "B:USR1@120"
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    reservation: str | None = None
    dependency: str | None = None
    array: str | None = None
    # One env mapping per array task (index = SLURM_ARRAY_TASK_ID - array_offset).
    sweep: tuple[tuple[tuple[str, str], ...], ...] = ()
    array_offset: int = 0
    portal_id: str | None = None
    # The `aiportal` executable on the compute nodes (stage in/out run inside the job).
    stage_bin: str = "aiportal"
    # The data-source credentials file for s3:// inputs/outputs: a file name inside job_dir
    # (written by the portal, mode 0600); the script passes only its path to `stage`.
    credentials_file: str | None = None
    # Or the user's own credentials file, by absolute path (``aiportal script --credentials``:
    # power users keep their keys in their home; the script passes the path and leaves the file)
    user_credentials: str | None = None
    #: the container argv up to the image (``containers.apptainer.job_exec_prefix``): strings,
    #: and tuples of parts that make one word, a part being a string or a :class:`ScriptDir`
    container: tuple[str | tuple[str | ScriptDir, ...], ...] = field(kw_only=True)

    def __post_init__(self):
        if isinstance(self.command, (str, bytes)):
            raise SpecError("command", self.command, "give the command as a list of arguments, not one string")
        object.__setattr__(self, "command", tuple(self.command))
        object.__setattr__(self, "env", tuple((str(k), str(v)) for k, v in (
            self.env.items() if isinstance(self.env, Mapping) else self.env)))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        if isinstance(self.container, (str, bytes)):
            raise SpecError("container", self.container, _CONTAINER_FIX)
        object.__setattr__(self, "container", tuple(
            tuple(w) if isinstance(w, list) else w for w in self.container))
        object.__setattr__(self, "sweep", tuple(tuple((str(k), str(v)) for k, v in (
            t.items() if isinstance(t, Mapping) else t)) for t in self.sweep))
        self._validate()

    def _validate(self) -> None:
        check_job_basics(self.name, self.partition, self.command, self.time_limit)
        _check_container(self.container)
        for what, path in (("image", self.image), ("job_dir", self.job_dir)):
            if not path.startswith("/") or any(c in path for c in "\0\n:,"):
                raise SpecError(what, path, "must be an absolute path on the shared filesystem, "
                                            "without newlines, ':' or ','")
        if self.gpus < 0 or self.cpus < 1 or (self.memory_mb is not None and self.memory_mb < 1):
            raise SpecError("resources", (self.gpus, self.cpus, self.memory_mb), "need gpus >= 0, cpus >= 1, memory_mb >= 1")
        if self.gpu_type is not None and not re.match(r"^[A-Za-z0-9_.-]+$", self.gpu_type):
            raise SpecError("gpu_type", self.gpu_type, "not a GPU type")
        for k, v in self.env + tuple(kv for task in self.sweep for kv in task):
            if not _ENV_RE.match(k):
                raise SpecError("env", k, "variable names are letters, digits and '_', not starting with a digit")
            if k in RESERVED_ENV or k.startswith(("SLURM_", "APPTAINER")):
                raise SpecError("env", k, "is set by aiportal or Slurm and cannot be overridden")
            if "\0" in v:
                raise SpecError("env", k, "values cannot contain NUL bytes")
        if self.checkpoint_signal is not None and not _SIGNAL_RE.match(self.checkpoint_signal):
            raise SpecError("checkpoint_signal", self.checkpoint_signal, "use e.g. B:USR1@120 (signal, seconds before the time limit)")
        if self.dependency is not None and not _DEPENDENCY_RE.match(self.dependency):
            raise SpecError("dependency", self.dependency, "use e.g. afterok:1234")
        if self.array is not None and not _ARRAY_RE.match(self.array):
            raise SpecError("array", self.array, "use e.g. 0-99 or 0-99%10")
        if self.sweep and self.array is None:
            raise SpecError("sweep", len(self.sweep), "a sweep needs an array range")
        for what in ("account", "qos", "constraint", "reservation"):
            value = getattr(self, what)
            if value is not None and not _PLAIN_RE.match(value):
                raise SpecError(what, value, "contains characters Slurm does not accept here")
        for uri in self.inputs + ((self.output,) if self.output else ()):
            if not uri or "\n" in uri or "\0" in uri:
                raise SpecError("data", uri, "data locations cannot be empty or contain newlines")
        if self.credentials_file is not None and (not _FILE_NAME_RE.match(self.credentials_file)
                                                  or self.credentials_file in (".", "..")):
            raise SpecError("credentials_file", self.credentials_file, "a file name inside the job directory "
                                                                       "(letters, digits, '.', '_', '-')")
        if self.user_credentials is not None and (not self.user_credentials.startswith("/")
                                                  or any(c in self.user_credentials for c in "\0\n")):
            raise SpecError("user_credentials", self.user_credentials, "an absolute path to your credentials file")
        if self.user_credentials and self.credentials_file:
            raise SpecError("user_credentials", self.user_credentials, "give one credentials file, not two")

    @classmethod
    def for_node_type(cls, node_type: NodeType, **kw) -> "JobSpec":
        """A spec on the node type's partition with all its GPUs (and a share of CPUs/memory
        unless given)."""
        gpus = kw.setdefault("gpus", node_type.gpus)
        if gpus > node_type.gpus:
            raise SpecError("gpus", gpus, "node type %s has %d GPUs per node" % (node_type.name, node_type.gpus))
        # the GPU model only where the site pins it (or the caller gives one): Slurm then schedules
        # on any GPU of the partition
        kw.setdefault("gpu_type", node_type.gpu_type if node_type.pin_gpu_type else None)
        # the CPUs and memory that come with the GPUs asked for: the node's shape per GPU (a whole
        # node's for all its GPUs); a job without GPUs gets one CPU and Slurm's default memory
        share = (gpus / node_type.gpus) if node_type.gpus and gpus else 0
        kw.setdefault("cpus", max(1, int(node_type.cpus * share)) if share else 1)
        kw.setdefault("memory_mb", max(1, int(node_type.memory_mb * share)) if share and node_type.memory_mb else None)
        return cls(partition=node_type.partition, **kw)
