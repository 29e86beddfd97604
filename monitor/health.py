"""One health-check run on a node: gather facts under a watchdog, run the checks, then (unless
a dry run) drain or resume the node by the ownership rule and keep the pass counter in
``STATE_DIR/NODE.json`` (node-local: a stuck shared filesystem cannot block it).

Run by ``aiportal health check`` as Slurm's HealthCheckProgram (as root, on every node, every
HealthCheckInterval, with only ``SLURMD_NODENAME`` in its environment) and on demand.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from monitor import facts as factsmod
from monitor.checks import Status, Verdict, run_checks
from monitor.config import HealthConfig
from monitor.ownership import Action, Decision, decide
from slurm.backend import SlurmCli
from slurm.errors import SlurmError

log = logging.getLogger(__name__)


@dataclass
class Report:
    node: str
    verdicts: list[Verdict]
    decision: Decision | None = None
    action_error: str = ""
    dry_run: bool = False
    seconds: float = 0.0
    faults: tuple[str, ...] = ()
    node_state: str = ""
    node_reason: str = ""
    state: dict = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return not any(v.failed for v in self.verdicts)

    @property
    def failures(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.failed]

    def to_dict(self, all_failures: bool = True) -> dict:
        verdicts = self.verdicts if all_failures else _first_failure_only(self.verdicts)
        return {
            "node": self.node, "healthy": self.healthy, "dry_run": self.dry_run,
            "seconds": round(self.seconds, 3), "node_state": self.node_state, "node_reason": self.node_reason,
            "verdicts": [v.to_dict() for v in verdicts],
            "action": self.decision.action.value if self.decision else None,
            "action_reason": self.decision.reason if self.decision else None,
            "passes": self.decision.passes if self.decision else None,
            "action_error": self.action_error or None, "faults": list(self.faults),
        }


def _first_failure_only(verdicts: list[Verdict]) -> list[Verdict]:
    """Verdicts up to and including the first failure (NHC's default mode)."""
    out = []
    for v in verdicts:
        out.append(v)
        if v.failed:
            break
    return out


def state_path(config: HealthConfig, node: str) -> Path:
    return Path(config.state_dir) / ("%s.json" % node)


def read_state(config: HealthConfig, node: str) -> dict:
    try:
        data = json.loads(state_path(config, node).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_state(config: HealthConfig, node: str, data: dict) -> None:
    """Atomically (write a temporary file, rename it over the old one); mode 0600, mkstemp's:
    the health check (root) is its only reader."""
    path = state_path(config, node)
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".%s." % node, dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)


def run_health_check(config: HealthConfig, node: str, dry_run: bool = False, backend: SlurmCli | None = None,
                     groups: dict | None = None) -> Report:
    """Gather, check, act. Returns within ``config.timeout_s`` plus the time of one Slurm call."""
    t0 = time.monotonic()
    deadline = t0 + config.timeout_s
    f = factsmod.gather(config, node, deadline, groups)
    verdicts = run_checks(f, config)
    report = Report(node, verdicts, dry_run=dry_run, faults=f.faults,
                    node_state=f.node_state.value if f.node_state else "", node_reason=f.node_reason)
    before = read_state(config, node)
    report.decision = decide(f.node_state, f.node_reason, verdicts, int(before.get("passes", 0)),
                             config.resume_after_passes)
    if not dry_run:
        backend = backend or SlurmCli(config.slurm_conf, timeout=min(config.probe_timeout_s,
                                                                   max(1.0, deadline - time.monotonic())))
        try:
            if report.decision.action is Action.DRAIN:
                backend.drain(node, report.decision.reason)
                log.warning("drained %s: %s", node, report.decision.reason)
            elif report.decision.action is Action.RESUME:
                backend.resume(node)
                log.warning("resumed %s: %s", node, report.decision.reason)
        except (SlurmError, ValueError) as e:
            report.action_error = str(e)
        report.state = {
            "node": node, "passes": report.decision.passes, "healthy": report.healthy,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.monotonic() - t0, 3),
            "failures": [v.to_dict() for v in report.failures],
            "last_action": report.decision.action.value if not report.action_error else "error: " + report.action_error,
        }
        try:
            write_state(config, node, report.state)
        except OSError as e:
            report.action_error = (report.action_error + "; " if report.action_error else "") + \
                "cannot keep the pass counter in %s: %s" % (state_path(config, node), e.strerror or e)
    report.seconds = time.monotonic() - t0
    return report


def format_report(report: Report, all_failures: bool) -> str:
    """Human-readable lines: one per verdict, then what was done."""
    lines = ["%s: %s in %.2fs%s" % (report.node, "healthy" if report.healthy else "UNHEALTHY", report.seconds,
                                    " (dry run: nothing changed)" if report.dry_run else "")]
    shown = report.verdicts if all_failures else _first_failure_only(report.verdicts)
    for v in shown:
        mark = {Status.PASS: "ok  ", Status.FAIL: "FAIL", Status.SKIP: "skip"}[v.status]
        text = "%s (limit %s)" % (v.value, v.limit) if v.status is not Status.SKIP else ""
        lines.append("  %s %-18s %s%s" % (mark, v.check, text, ("  -- " + v.detail) if v.detail else ""))
    if not all_failures and len(report.failures) > 1:
        lines.append("  (%d more failures: --all shows them)" % (len(report.failures) - 1))
    if report.faults:
        lines.append("  injected faults (dev cluster): %s" % ", ".join(report.faults))
    if report.decision:
        lines.append("  action: %s -- %s" % (report.decision.action.value, report.decision.reason))
    if report.action_error:
        lines.append("  action failed: %s" % report.action_error)
    return "\n".join(lines)
