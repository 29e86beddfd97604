"""The Slurm backend on the Slurm command-line tools.

Every command goes through :meth:`SlurmCli._call`: an argv list (never a shell), a timeout
(with slurmctld down, Slurm clients retry for minutes), DEBUG logging of the argv, and a
:class:`SlurmCommandError` carrying argv, exit code, stdout and stderr on failure.
"""
from __future__ import annotations

import logging
import os
import shlex
import subprocess
from dataclasses import dataclass

from slurm.cluster import SEP, Node, Partition, parse_gres_used, parse_sinfo_nodes, sinfo_node_format
from slurm.errors import SlurmCommandError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterView:
    name: str
    partitions: list[Partition]
    nodes: list[Node]

    def to_dict(self) -> dict:
        return {
            "cluster": self.name,
            "partitions": [p.to_dict() for p in self.partitions],
            "nodes": [n.to_dict() for n in self.nodes],
            "gpus": sum(n.gpus for n in self.nodes),
            "gpus_used": sum(n.gpus_used for n in self.nodes),
        }


class SlurmCli:
    """Talks to Slurm through sinfo/squeue/sbatch/scontrol (pyslurm is not installable here)."""

    def __init__(self, slurm_conf: str | None = None, timeout: float = 15.0, cluster_name: str = ""):
        self.slurm_conf = slurm_conf
        self.timeout = timeout
        self.cluster_name = cluster_name

    def _call(self, argv: list[str], stdin: str | None = None) -> str:
        env = dict(os.environ)
        if self.slurm_conf:
            env["SLURM_CONF"] = self.slurm_conf
        log.debug("run %s", shlex.join(argv))
        try:
            res = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                 timeout=self.timeout, env=env, check=False)
        except subprocess.TimeoutExpired as e:
            raise SlurmCommandError(argv, None, e.stdout or "", e.stderr or "",
                                    hint="is slurmctld running? `scontrol ping`") from e
        except FileNotFoundError as e:
            raise SlurmCommandError(argv, 127, "", str(e),
                                    hint="Slurm client tools are not installed; run `make run`") from e
        if res.returncode != 0:
            raise SlurmCommandError(argv, res.returncode, res.stdout, res.stderr)
        return res.stdout

    def cluster(self) -> ClusterView:
        """Partitions and nodes with state, reasons and GPUs, in two sinfo calls."""
        text = self._call(["sinfo", "--noheader", "--Node", "--format", sinfo_node_format()])
        used = self._call(["sinfo", "--noheader", "--Node", "--Format",
                           "NodeList:0%s,GresUsed:0" % SEP])
        nodes, partitions = parse_sinfo_nodes(text, parse_gres_used(used))
        return ClusterView(self.cluster_name, partitions, nodes)
