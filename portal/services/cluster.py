"""The cluster as users see it, read live from Slurm once per request (one ``sinfo`` look, one
``squeue``): partitions, nodes, GPUs per node type, the queue, and recent node events. The page
and the API show the same :class:`ClusterPage`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, select

from portal.models import Event
from portal.settings import Settings
from slurm.backend import ClusterView
from slurm.spec import NodeType
from slurm.states import JobState


@dataclass(frozen=True)
class NodeTypeUse:
    type: NodeType
    nodes: int
    gpus: int
    gpus_used: int


@dataclass(frozen=True)
class ClusterPage:
    view: ClusterView
    pending: int
    running: int
    by_type: tuple[NodeTypeUse, ...]
    events: tuple[Event, ...]

    def to_dict(self) -> dict[str, Any]:
        """The API's answer (its events are added by the view, as public models)."""
        out = self.view.to_dict()
        out["queue"] = {"pending": self.pending, "running": self.running}
        return out


def node_events(db: Session, limit: int = 50) -> tuple[Event, ...]:
    """The latest node events (drains, resumes, nodes down), newest first."""
    return tuple(db.exec(select(Event).where(Event.node.is_not(None), Event.job_id.is_(None))
                         .order_by(Event.at.desc()).limit(limit)).all())


def cluster_page(db: Session, settings: Settings, backend) -> ClusterPage:
    """Raises :class:`slurm.errors.SlurmError` when Slurm cannot be asked."""
    view = backend.cluster()
    states = [s.state for s in backend.queue().values()]
    by_type = []
    for t in settings.node_types.values():
        members = [n for n in view.nodes if t.partition in n.partitions]
        by_type.append(NodeTypeUse(t, len(members), sum(n.gpus for n in members),
                                   sum(n.gpus_used for n in members)))
    return ClusterPage(view, states.count(JobState.PENDING), states.count(JobState.RUNNING), tuple(by_type),
                       node_events(db))
