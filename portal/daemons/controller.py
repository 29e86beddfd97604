"""The service controller (one step of every ``aiportal reconcile`` cycle): it submits replica
jobs (stored first, then ``sbatch`` as the owner, adopted by their ``--comment`` if the portal
stopped in between), reads each replica's ``endpoint.json``, probes ``/healthz`` and ``/stats``
(all replicas at once, with a timeout), and applies :func:`inference.controller.plan_service`:
readiness, replacement of ended and failing replicas, autoscaling, rolling updates, deletion."""
from __future__ import annotations

import json
import logging
import pwd
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping

from sqlmodel import Session, select

from inference.controller import Phase, ReplicaView, ServiceView, Timing, plan_service
from inference.endpoints import read_endpoint
from inference.errors import EndpointError, ServiceSpecError
from inference.probe import ProbeResult, probe
from inference.service import RUNTIME_CONFIG, ServiceSpec, replica_job, runtime_config
from portal.models import Service, ServiceReplica, ServiceState, User, utcnow
from portal.services import datasources
from portal.services.inference import COMMENT_SERVICE, open_key, replicas_of
from portal.services.job_data import check_job_data
from portal.services.service_dirs import install_runtime, prepare_replica_dir, write_runtime_config
from portal.settings import Settings
from slurm.errors import SlurmError, SpecError
from slurm.jobs import JobStatus
from slurm.render import render_sbatch
from slurm.spec import resolve_node_type
from slurm.states import JobState
from storage.credentials import JOB_CREDENTIALS_NAME, SecretBox, write_job_credentials
from storage.errors import CredentialsError, StorageError

log = logging.getLogger(__name__)


def _timing(settings: Settings) -> Timing:
    return Timing(initial_delay_s=settings.service_initial_delay_s, probe_timeout_s=settings.service_probe_timeout_s,
                  failure_threshold=settings.service_failure_threshold,
                  unhealthy_timeout_s=settings.service_unhealthy_timeout_s,
                  startup_timeout_s=settings.service_startup_timeout_s, drain_grace_s=settings.service_drain_grace_s)


def _view(r: ServiceReplica, status: JobStatus | None, pr: ProbeResult | None) -> ReplicaView:
    detail = ""
    if status is not None and status.exit_code is not None:
        detail = "exit code %d" % status.exit_code
    return ReplicaView(
        id=r.id, generation=r.generation, phase=r.phase, created_at=r.created_at,
        job_state=status.state if status else None, job_detail=detail, probe=pr, started_at=r.started_at,
        ready_at=r.ready_at, probe_failures=r.probe_failures, unhealthy_since=r.unhealthy_since,
        draining_since=r.draining_since, cancel_requested=r.cancel_requested,
        last_inflight_seconds=r.last_inflight_seconds, last_sample_at=r.last_sample_at, avg_inflight=r.avg_inflight,
        message=r.message)


class ServiceController:
    """One cycle keeps every service's replicas as its plan says (see the module docstring)."""

    def __init__(self, engine, backend, settings: Settings, box: SecretBox | None = None):
        self.engine, self.backend, self.settings, self.box = engine, backend, settings, box
        self.timing = _timing(settings)
        #: sealed key -> clear key: each service's key is opened once per process
        self._keys: dict[str, str] = {}
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="probe")

    def close(self) -> None:
        self.pool.shutdown(wait=False)

    def key_of(self, svc: Service) -> str | None:
        """The service's key in clear (None: a service from before keys). The box is made from
        the settings when none was given; CredentialsError names the fix when the data key is
        missing or is not the one that sealed it."""
        if not svc.key_sealed:
            return None
        key = self._keys.get(svc.key_sealed)
        if key is None:
            box = self.box if self.box is not None else SecretBox(self.settings.data_key)
            key = self._keys[svc.key_sealed] = open_key(box, svc)
        return key

    def cycle(self, queue: Mapping[str, JobStatus] | None = None) -> int:
        """One pass over all services; ``queue`` is this cycle's squeue answer when the
        reconciler already has it. Returns the number of services looked at."""
        with Session(self.engine, expire_on_commit=False) as db:
            services = list(db.exec(select(Service)))
            if not services:
                return 0
            replicas = list(db.exec(select(ServiceReplica).where(ServiceReplica.phase != Phase.ENDED)))
            if queue is None:
                queue = self.backend.queue()
            statuses = self._statuses(db, replicas, queue)
            probes = self._probes(db, replicas, statuses, self._probe_keys(services))
            now = utcnow()
            for svc in services:
                mine = [r for r in replicas if r.service_id == svc.id]
                try:
                    self._apply(db, svc, mine, statuses, probes, now)
                    db.commit()
                except (SlurmError, OSError, SpecError, StorageError, ServiceSpecError) as e:
                    db.rollback()
                    log.warning("service %s: %s", svc.name, e)
            return len(services)

    def _statuses(self, db: Session, replicas: list[ServiceReplica], queue) -> dict[str, JobStatus]:
        """Job status per replica id: the queue, adoption by comment, accounting for the rest."""
        by_comment = {st.comment[len(COMMENT_SERVICE):]: jid for jid, st in queue.items()
                      if st.comment.startswith(COMMENT_SERVICE)}
        out: dict[str, JobStatus] = {}
        gone = []
        for r in replicas:
            if not r.slurm_job_id and r.id in by_comment:
                r.slurm_job_id = by_comment[r.id]      # submitted, but the portal stopped before storing it
                db.add(r)
                log.info("replica %s: adopted Slurm job %s by its comment", r.id, r.slurm_job_id)
            if not r.slurm_job_id:
                continue
            st = queue.get(r.slurm_job_id)
            if st is not None and not st.state.terminal:
                out[r.id] = st
            else:
                gone.append(r)
        if gone:
            acct = self.backend.accounting([r.slurm_job_id for r in gone])
            for r in gone:
                st = acct.get(r.slurm_job_id) or queue.get(r.slurm_job_id)
                if st is not None:
                    out[r.id] = st
        return out

    def _probe_keys(self, services: list[Service]) -> dict[str, str | None]:
        """Key per service id for the probes; a key that cannot be opened is logged (its
        replicas' /stats then refuse the probe: no load figures, readiness still known)."""
        sealed = {svc.key_sealed for svc in services}
        self._keys = {k: v for k, v in self._keys.items() if k in sealed}      # deleted services' go
        keys = {}
        for svc in services:
            try:
                keys[svc.id] = self.key_of(svc)
            except CredentialsError as e:
                log.warning("service %s: %s", svc.name, e)
                keys[svc.id] = None
        return keys

    def _probes(self, db: Session, replicas: list[ServiceReplica], statuses,
                keys: Mapping[str, str | None]) -> dict[str, ProbeResult]:
        """Read missing endpoints, then probe every running replica at once (with its service's
        key)."""
        todo = []
        now = utcnow()
        for r in replicas:
            st = statuses.get(r.id)
            if st is None or st.state is not JobState.RUNNING or r.phase in (Phase.DRAINING, Phase.ENDED):
                continue
            if r.host is None:
                try:
                    ep = read_endpoint(Path(r.job_dir) / "run", r.slurm_job_id)
                except EndpointError as e:
                    log.info("replica %s: %s", r.id, e)
                    ep = None
                if ep is None:
                    continue
                r.host, r.port = ep.host, ep.port
                db.add(r)
            if r.started_at is not None and (now - r.started_at).total_seconds() < self.timing.initial_delay_s:
                continue
            todo.append(r)
        futures = {r.id: self.pool.submit(probe, r.host, r.port, self.timing.probe_timeout_s, keys.get(r.service_id))
                   for r in todo}
        return {rid: f.result() for rid, f in futures.items()}

    def _apply(self, db: Session, svc: Service, rows: list[ServiceReplica], statuses, probes, now) -> None:
        view = ServiceView(id=svc.id, generation=svc.generation, min_replicas=svc.min_replicas,
                           max_replicas=svc.max_replicas, desired=svc.desired, target_inflight=svc.target_inflight,
                           scale_down_delay_s=svc.scale_down_delay_s, next_generation=svc.next_generation,
                           next_weight=svc.next_weight,
                           deleting=svc.state is ServiceState.DELETING, low_since=svc.low_since,
                           failures=svc.failures, last_failure_at=svc.last_failure_at)
        by_id = {r.id: r for r in rows}
        plan = plan_service(view, [_view(r, statuses.get(r.id), probes.get(r.id)) for r in rows], now, self.timing)
        for ev in plan.events:
            log.info("service %s: %s", svc.name, ev)
        for nr in plan.replicas:
            row = by_id[nr.id]
            if nr.phase is Phase.ENDED and row.phase is not Phase.ENDED:
                row.ended_at = now
            if nr.phase is Phase.DRAINING and row.phase is not Phase.DRAINING:
                row.draining_since = now
            for f in ("phase", "started_at", "ready_at", "probe_failures", "unhealthy_since", "last_inflight_seconds",
                      "last_sample_at", "avg_inflight"):
                setattr(row, f, getattr(nr, f))
            row.message = nr.message[:2000]
            db.add(row)
        owner = db.get(User, svc.user_id)
        for rid in plan.cancel:
            row = by_id[rid]
            if row.slurm_job_id:
                try:
                    self.backend.cancel(row.slurm_job_id, user=owner.unix_user)
                except SlurmError as e:
                    log.warning("replica %s: cancelling job %s failed: %s", rid, row.slurm_job_id, e)
                    continue
            row.cancel_requested = True
            db.add(row)
        svc.desired, svc.low_since = plan.desired, plan.low_since
        if plan.failures > svc.failures and not plan.rollout:
            ended = [r for r in plan.replicas if r.phase is Phase.ENDED and r.message]
            svc.message = "a replica failed to start: %s" % (ended[-1].message if ended else "see its log")
        svc.failures, svc.last_failure_at = plan.failures, plan.last_failure_at
        if plan.rollout == "done":
            svc.generation, svc.spec_json = svc.next_generation, svc.next_spec_json
            svc.next_generation, svc.next_spec_json, svc.state = None, None, ServiceState.RUNNING
            svc.next_weight = None
            svc.message = "rolled out version %s" % svc.spec.get("version")
        elif plan.rollout == "failed":
            svc.next_generation, svc.next_spec_json, svc.state = None, None, ServiceState.RUNNING
            svc.next_weight = None
            svc.message = "rolling update failed, the previous version keeps serving: %s" % plan.rollout_message
        svc.updated_at = now
        db.add(svc)
        if plan.delete:
            for r in replicas_of(db, svc, include_ended=True):
                db.delete(r)
            db.flush()
            db.delete(svc)
            shutil.rmtree(svc.service_dir, ignore_errors=True)
            log.info("service %s deleted", svc.name)
            return
        db.commit()
        for gen in plan.submit:
            self.submit_replica(db, svc, owner, gen)

    def submit_replica(self, db: Session, svc: Service, owner: User, generation: int) -> ServiceReplica:
        """Store the replica, then submit its job as the owner (a failure ends the replica
        with sbatch's message, and counts as a failed start)."""
        spec = ServiceSpec.from_json(json.loads(svc.next_spec_json) if generation == svc.next_generation
                                     else svc.spec)
        row = ServiceReplica(service_id=svc.id, generation=generation, version=spec.version)
        row.job_dir = str(Path(svc.service_dir) / "replicas" / row.id)
        db.add(row)
        db.commit()
        try:
            job_dir = prepare_replica_dir(self.settings, owner.unix_user, Path(svc.service_dir), row.id)
            pw = pwd.getpwnam(owner.unix_user)
            runtime_path = install_runtime(Path(svc.service_dir), pw)
            node_type = resolve_node_type(self.settings.service_node_type, self.settings.node_types)
            needed = check_job_data(self.settings, owner.unix_user, [spec.model], None,
                                    datasources.sources_of(db, self.box, owner) if self.box else {},
                                    check_store=False)
            creds = None
            if needed:
                write_job_credentials(str(job_dir), needed.values(), user=owner.unix_user, name=JOB_CREDENTIALS_NAME)
                creds = JOB_CREDENTIALS_NAME
            job = replica_job(spec, node_type, service=svc.name, replica_id=row.id, job_dir=str(job_dir),
                              runtime_path=str(runtime_path), stage_bin=self.settings.stage_bin,
                              credentials_file=creds)
            write_runtime_config(job_dir / "run" / RUNTIME_CONFIG, pw,
                                 runtime_config(spec, bind_host=self.settings.service_bind_host, key=self.key_of(svc)))
            row.slurm_job_id = self.backend.submit(render_sbatch(job), user=owner.unix_user)
            row.message = "submitted"
            log.info("service %s: replica %s (version %s) is Slurm job %s", svc.name, row.id, spec.version,
                     row.slurm_job_id)
        except (SlurmError, OSError, SpecError, StorageError, ServiceSpecError, KeyError) as e:
            row.phase, row.ended_at, row.message = Phase.ENDED, utcnow(), ("could not submit: %s" % e)[:2000]
            svc.failures += 1
            svc.last_failure_at = utcnow()
            svc.message = row.message
            if svc.next_generation == generation:
                svc.next_generation, svc.next_spec_json, svc.state = None, None, ServiceState.RUNNING
                svc.next_weight = None
                svc.message = "rolling update failed, the previous version keeps serving: %s" % row.message
            db.add(svc)
            log.warning("service %s: replica %s %s", svc.name, row.id, row.message)
        db.add(row)
        db.commit()
        return row


