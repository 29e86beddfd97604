"""Typed views of partitions and nodes, and the pure parsers that build them from sinfo.

Slurm's node state strings become a :class:`NodeState` once, here, through one table;
nothing else compares against ``"idle"``. Unknown states become ``UNKNOWN`` with a warning.
"""
from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass

from slurm.errors import SlurmParseError

log = logging.getLogger(__name__)

# Field separator in our sinfo output format (never appears in node names, states or reasons).
SEP = "\x1f"


class NodeState(enum.Enum):
    """Base state of a node, as sinfo's long state (%T) reports it."""

    IDLE = "idle"                #: up, no jobs
    MIXED = "mixed"              #: some CPUs/GPUs allocated
    ALLOCATED = "allocated"      #: fully allocated
    COMPLETING = "completing"    #: jobs are finishing
    DRAINING = "draining"        #: drain requested, jobs still running: takes no new jobs
    DRAINED = "drained"          #: drained and empty
    DOWN = "down"                #: unavailable (slurmd not responding or set down)
    FAIL = "fail"                #: failed, jobs being requeued
    FAILING = "failing"
    RESERVED = "reserved"
    MAINTENANCE = "maint"
    FUTURE = "future"
    INVALID = "inval"            #: registered with less than configured (e.g. missing GPUs)
    PLANNED = "planned"
    POWERED_DOWN = "powered_down"
    UNKNOWN = "unknown"

    @property
    def schedulable(self) -> bool:
        """Whether the node can take new jobs in this state."""
        return self in _SCHEDULABLE


_SCHEDULABLE = frozenset({NodeState.IDLE, NodeState.MIXED, NodeState.ALLOCATED,
                          NodeState.COMPLETING, NodeState.PLANNED})

# Every spelling sinfo uses (22.05 and 24.11), mapped once.
_STATE_TABLE: dict[str, NodeState] = {
    "idle": NodeState.IDLE, "mixed": NodeState.MIXED, "mix": NodeState.MIXED,
    "allocated": NodeState.ALLOCATED, "alloc": NodeState.ALLOCATED,
    "completing": NodeState.COMPLETING, "comp": NodeState.COMPLETING,
    "draining": NodeState.DRAINING, "drng": NodeState.DRAINING,
    "drained": NodeState.DRAINED, "drain": NodeState.DRAINED,
    "down": NodeState.DOWN, "fail": NodeState.FAIL, "failing": NodeState.FAILING,
    "reserved": NodeState.RESERVED, "resv": NodeState.RESERVED,
    "maint": NodeState.MAINTENANCE, "future": NodeState.FUTURE, "futr": NodeState.FUTURE,
    "inval": NodeState.INVALID, "planned": NodeState.PLANNED, "plnd": NodeState.PLANNED,
    "powered_down": NodeState.POWERED_DOWN, "unknown": NodeState.UNKNOWN, "unk": NodeState.UNKNOWN,
}
# Suffix flags sinfo appends to a state (man sinfo, NODE STATE CODES).
_FLAGS = "*~#%$@!^-"


def parse_node_state(text: str) -> tuple[NodeState, bool]:
    """``"drained*"`` -> ``(NodeState.DRAINED, False)``: the state and whether slurmd responds."""
    raw = text.strip().lower()
    responding = "*" not in raw
    base = raw.rstrip(_FLAGS).split("+")[0]
    state = _STATE_TABLE.get(base)
    if state is None:
        log.warning("unknown Slurm node state %r, treated as UNKNOWN", text)
        state = NodeState.UNKNOWN
    return state, responding


@dataclass(frozen=True)
class Gres:
    """One generic resource entry, e.g. ``gpu:p40:4``."""

    name: str
    type: str | None
    count: int


_GRES_RE = re.compile(r"^(?P<name>[A-Za-z0-9_]+)(?::(?P<type>[A-Za-z0-9_.\-]+))?(?::(?P<count>\d+))?(?:\(.*\))?$")


def parse_gres(text: str) -> tuple[Gres, ...]:
    """Parse sinfo's Gres/GresUsed column.

    ``"gpu:p40:4(S:0)"`` -> ``(Gres("gpu", "p40", 4),)``; ``"gpu:p40:2(IDX:0-1)"`` -> count 2;
    ``"(null)"`` or empty -> ``()``. A type that is all digits is a count (``gpu:2``).
    """
    text = text.strip()
    if not text or text in ("(null)", "N/A"):
        return ()
    out = []
    # entries are comma separated, but IDX lists inside parentheses contain commas too
    for entry in re.split(r",(?![^()]*\))", text):
        m = _GRES_RE.match(entry.strip())
        if not m:
            raise SlurmParseError(text, "gres entry %r is not NAME[:TYPE][:COUNT]" % entry)
        gtype, count = m.group("type"), m.group("count")
        if count is None and gtype is not None and gtype.isdigit():
            gtype, count = None, gtype
        out.append(Gres(m.group("name"), gtype, int(count) if count is not None else 1))
    return tuple(out)


def gpu_count(gres: tuple[Gres, ...]) -> int:
    return sum(g.count for g in gres if g.name == "gpu")


@dataclass(frozen=True)
class Node:
    name: str
    partitions: tuple[str, ...]
    state: NodeState
    responding: bool
    cpus: int
    cpus_allocated: int
    memory_mb: int
    gpus: int
    gpus_used: int
    gpu_type: str | None
    reason: str

    def to_dict(self) -> dict:
        return {
            "name": self.name, "partitions": list(self.partitions), "state": self.state.value,
            "responding": self.responding, "schedulable": self.state.schedulable and self.responding,
            "cpus": self.cpus, "cpus_allocated": self.cpus_allocated, "memory_mb": self.memory_mb,
            "gpus": self.gpus, "gpus_used": self.gpus_used, "gpu_type": self.gpu_type,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Partition:
    name: str
    default: bool
    nodes: tuple[str, ...]
    max_time: str
    gpus: int
    gpus_used: int

    def to_dict(self) -> dict:
        return {"name": self.name, "default": self.default, "nodes": list(self.nodes),
                "max_time": self.max_time, "gpus": self.gpus, "gpus_used": self.gpus_used}


# sinfo -N -h -o with these fields, separated by SEP, one line per (node, partition).
SINFO_NODE_FIELDS = ("%N", "%R", "%T", "%C", "%m", "%G", "%E", "%l", "%P")


def sinfo_node_format() -> str:
    return SEP.join(SINFO_NODE_FIELDS)


def _int(text: str, line: str, what: str) -> int:
    try:
        return int(text.strip().rstrip("+"))
    except ValueError as e:
        raise SlurmParseError(line, "%s %r is not a number" % (what, text)) from e


def parse_sinfo_nodes(text: str, gres_used: dict[str, tuple[Gres, ...]] | None = None
                      ) -> tuple[list[Node], list[Partition]]:
    """Parse ``sinfo -N -h -o FORMAT`` (see :data:`SINFO_NODE_FIELDS`) into nodes and partitions.

    A node in several partitions appears on several lines; it is merged. ``gres_used`` maps node
    names to their allocated GRES (from :func:`parse_gres_used`); missing means none used.
    """
    gres_used = gres_used or {}
    nodes: dict[str, Node] = {}
    parts: dict[str, dict] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        cols = line.split(SEP)
        if len(cols) != len(SINFO_NODE_FIELDS):
            raise SlurmParseError(line, "expected %d fields, got %d" % (len(SINFO_NODE_FIELDS), len(cols)))
        name, partition, state_s, cpus_s, mem_s, gres_s, reason, max_time, part_mark = (c.strip() for c in cols)
        state, responding = parse_node_state(state_s)
        alloc, _idle, _other, total = (_int(x, line, "CPU count") for x in cpus_s.split("/"))
        gres = parse_gres(gres_s)
        used = gres_used.get(name, ())
        gtypes = [g.type for g in gres if g.name == "gpu" and g.type]
        p = parts.setdefault(partition, {"default": part_mark.endswith("*"), "nodes": [], "max_time": max_time})
        p["nodes"].append(name)
        if name in nodes:
            old = nodes[name]
            nodes[name] = Node(**{**old.__dict__, "partitions": old.partitions + (partition,)})
            continue
        nodes[name] = Node(
            name=name, partitions=(partition,), state=state, responding=responding,
            cpus=total, cpus_allocated=alloc, memory_mb=_int(mem_s, line, "memory"),
            gpus=gpu_count(gres), gpus_used=gpu_count(used), gpu_type=gtypes[0] if gtypes else None,
            reason="" if reason in ("none", "(null)") else reason,
        )
    partitions = [
        Partition(name=pname, default=p["default"], nodes=tuple(p["nodes"]), max_time=p["max_time"],
                  gpus=sum(nodes[n].gpus for n in p["nodes"]),
                  gpus_used=sum(nodes[n].gpus_used for n in p["nodes"]))
        for pname, p in parts.items()
    ]
    return list(nodes.values()), partitions


def parse_gres_used(text: str) -> dict[str, tuple[Gres, ...]]:
    """Parse ``sinfo -N -h -O NodeList:SEP...,GresUsed`` lines: ``NAME<SEP>GRESUSED``."""
    out = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, used = line.partition(SEP)
        out[name.strip()] = parse_gres(used)
    return out
