"""Inference services in the database, and the controller that keeps their replicas running.

Use cases (the API, the CLI and the Services page call them): deploy, list, show, scale,
update (a rolling update to a new version), delete. A request only changes the service's row;
the **controller** (:class:`ServiceController`, one step of every ``aiportal reconcile`` cycle)
does the rest: it submits replica jobs (stored first, then ``sbatch`` as the owner, adopted by
their ``--comment`` if the portal stopped in between), reads each replica's ``endpoint.json``,
probes ``/healthz`` and ``/stats`` (all replicas at once, with a timeout), and applies
:func:`inference.controller.plan_service`: readiness, replacement of ended and failing
replicas, autoscaling, rolling updates, deletion.

Folders: ``SHARED/services/SERVICE_ID/`` (owned by the user's Unix account, mode 0700; the
portal, root, reads it) holds ``runtime.py`` (a copy of :mod:`inference.runtime`, bound
read-only into each replica) and ``replicas/REPLICA_ID/{data,run,logs}``: the staged model,
the runtime's config and ``endpoint.json``, the job log.

Keys: each service gets a random key at deploy time, stored sealed with the site's data key
(``Service.key_sealed``). It reaches a replica only in its ``runtime.json`` (mode 0600, the
user's), and the router and the probes send it (``X-Aiportal-Key``): replicas answer nobody
else. It is never logged, never in a batch script, never in an API answer.
"""
from __future__ import annotations

import json
import logging
import os
import pwd
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

from sqlmodel import Session, select

import inference.runtime
from inference.controller import Phase, ReplicaView, ServiceView, Timing, plan_service
from inference.endpoints import read_endpoint
from inference.errors import EndpointError, ServiceSpecError
from inference.probe import ProbeResult, probe
from inference.service import RUNTIME_CONFIG, ScalePolicy, ServiceSpec, check_name, replica_job, runtime_config
from portal.errors import ConflictError, NotFoundError, ValidationError
from portal.models import Service, ServiceReplica, ServiceState, User, utcnow
from portal.services import datasources
from portal.services.data import check_job_data
from portal.settings import Settings
from slurm.errors import SlurmError, SpecError
from slurm.jobs import JobStatus
from slurm.render import COMMENT_PREFIX, render_sbatch
from slurm.spec import resolve_node_type
from slurm.states import JobState
from storage.credentials import JOB_CREDENTIALS_NAME, SecretBox, write_job_credentials
from storage.errors import CredentialsError, StorageError

log = logging.getLogger(__name__)

POLICY_FIELDS = ("min_replicas", "max_replicas", "target_inflight", "scale_down_delay_s")
COMMENT_SERVICE = COMMENT_PREFIX + "service:"
#: random bytes of a service's key (url-safe base64: 43 characters)
KEY_BYTES = 32


# -- input -----------------------------------------------------------------------------------

def _invalid(e: ServiceSpecError) -> ValidationError:
    return ValidationError(e.field, e.detail)


def parse_policy(body: Mapping[str, Any], base: ScalePolicy | None = None) -> ScalePolicy:
    kw = {k: body[k] for k in POLICY_FIELDS if k in body and body[k] is not None}
    if "replicas" in body and body["replicas"] is not None:      # a fixed count: min = max
        kw.setdefault("min_replicas", body["replicas"])
        kw.setdefault("max_replicas", body["replicas"])
    if base is not None:
        kw = {**base.__dict__, **kw}
    if "min_replicas" in kw and "max_replicas" not in kw:
        kw["max_replicas"] = max(kw["min_replicas"], 1)
    try:
        return ScalePolicy(**kw)
    except ServiceSpecError as e:
        raise _invalid(e) from None
    except TypeError as e:
        raise ValidationError("body", str(e)) from None


def parse_deploy(body: Mapping[str, Any]) -> tuple[str, ServiceSpec, ScalePolicy]:
    """Name, spec and scaling policy from a deploy request; ValidationError names the field."""
    try:
        name = check_name(body.get("name"))
    except ServiceSpecError as e:
        raise _invalid(e) from None
    spec_body = {k: v for k, v in body.items() if k not in POLICY_FIELDS + ("name", "replicas")}
    try:
        spec = ServiceSpec.from_json(spec_body)
    except ServiceSpecError as e:
        raise _invalid(e) from None
    except TypeError as e:
        raise ValidationError("body", str(e)) from None
    return name, spec, parse_policy(body)


def _check_runs_here(db: Session, settings: Settings, box: SecretBox, user: User, spec: ServiceSpec) -> None:
    """What only the site can say: the node type, the image file, the model location."""
    if not user.unix_user:
        raise ValidationError("user", "account %r has no Unix user, so it cannot run services; use a user "
                                      "account" % user.name)
    try:
        node_type = resolve_node_type(settings.service_node_type, settings.node_types)
        replica_job(spec, node_type, service="check", replica_id="0" * 36, job_dir="/check", runtime_path="/check")
    except (ServiceSpecError, SpecError) as e:
        raise ValidationError(getattr(e, "field", "spec"), str(e)) from None
    from portal.services.images import check_user_can_read
    from containers.errors import ImageRefError
    if not Path(spec.image).is_file():
        raise ValidationError("image", "%s does not exist; give a .sif on the shared filesystem" % spec.image)
    if os.geteuid() == 0:
        try:
            check_user_can_read(user.unix_user, spec.image)
        except ImageRefError as e:
            raise ValidationError("image", str(e)) from None
    try:
        check_job_data(settings, user.unix_user, [spec.model], None, datasources.sources_of(db, box, user))
    except StorageError as e:
        raise ValidationError("model", str(e)) from None


# -- use cases -------------------------------------------------------------------------------

def deploy(db: Session, settings: Settings, box: SecretBox, user: User, body: Mapping[str, Any]) -> Service:
    name, spec, policy = parse_deploy(body)
    if db.exec(select(Service).where(Service.name == name)).first() is not None:
        raise ConflictError("a service named %r exists (service names are the URL /service/NAME, unique on "
                            "the site); pick another name, or `aiportal service update %s`" % (name, name))
    _check_runs_here(db, settings, box, user, spec)
    svc = Service(user_id=user.id, name=name, spec_json=json.dumps(spec.to_json()),
                  min_replicas=policy.min_replicas, max_replicas=policy.max_replicas,
                  desired=policy.min_replicas, target_inflight=float(policy.target_inflight),
                  scale_down_delay_s=float(policy.scale_down_delay_s),
                  key_sealed=box.seal(secrets.token_urlsafe(KEY_BYTES)))
    svc.service_dir = str(Path(settings.shared_root) / "services" / svc.id)
    prepare_service_dir(settings, user.unix_user, Path(svc.service_dir))
    db.add(svc)
    db.commit()
    log.info("service %s (%s) deployed by %s: %s", name, svc.id, user.name, spec.to_json())
    return svc


def list_services(db: Session, user: User) -> list[Service]:
    q = select(Service).order_by(Service.name)
    if not user.is_admin:
        q = q.where(Service.user_id == user.id)
    return list(db.exec(q))


def get_service(db: Session, user: User, name: str) -> Service:
    svc = db.exec(select(Service).where(Service.name == name)).first()
    if svc is None or (svc.user_id != user.id and not user.is_admin):
        raise NotFoundError("you have no service named %r (`aiportal service list`)" % name)
    return svc


def replicas_of(db: Session, svc: Service, include_ended: bool = False) -> list[ServiceReplica]:
    q = select(ServiceReplica).where(ServiceReplica.service_id == svc.id)
    if not include_ended:
        q = q.where(ServiceReplica.phase != Phase.ENDED)
    return list(db.exec(q.order_by(ServiceReplica.created_at)))


def scale(db: Session, user: User, name: str, body: Mapping[str, Any]) -> Service:
    svc = get_service(db, user, name)
    if svc.state is ServiceState.DELETING:
        raise ConflictError("service %s is being deleted" % name)
    if not any(k in body for k in POLICY_FIELDS + ("replicas",)):
        raise ValidationError("body", "give replicas, or min_replicas/max_replicas/target_inflight/scale_down_delay_s")
    unknown = set(body) - set(POLICY_FIELDS + ("replicas",))
    if unknown:
        raise ValidationError("body", "unknown fields %s" % ", ".join(sorted(map(str, unknown))))
    base = ScalePolicy(svc.min_replicas, svc.max_replicas, svc.target_inflight, svc.scale_down_delay_s)
    if "min_replicas" in body and "max_replicas" not in body and "replicas" not in body:
        body = {**body, "max_replicas": max(body["min_replicas"] if isinstance(body["min_replicas"], int) else 0,
                                            svc.max_replicas)}
    policy = parse_policy(body, base)
    svc.min_replicas, svc.max_replicas = policy.min_replicas, policy.max_replicas
    svc.target_inflight, svc.scale_down_delay_s = float(policy.target_inflight), float(policy.scale_down_delay_s)
    svc.desired = min(max(svc.desired, svc.min_replicas), svc.max_replicas)
    svc.low_since, svc.updated_at = None, utcnow()
    db.add(svc)
    db.commit()
    return svc


def update(db: Session, settings: Settings, box: SecretBox, user: User, name: str, body: Mapping[str, Any]) -> Service:
    """Start a new version: a rolling update to the spec with ``body``'s fields changed, or with
    ``weight`` (1-99) a gray release that runs it beside the current one for that share of the
    requests. ``weight`` alone changes a gray release under way: 100 rolls it out, 0 stops it."""
    svc = get_service(db, user, name)
    if not isinstance(body, Mapping) or not body:
        raise ValidationError("body", "give the fields to change, e.g. version and model (and weight for a gray "
                                      "release)")
    body = dict(body)
    weight = body.pop("weight", None)
    if weight is not None and (not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 100):
        raise ValidationError("weight", "the share of requests for the new version: a whole number 0-100")
    if not body:
        return _reweigh(db, svc, weight)
    if svc.state is not ServiceState.RUNNING:
        raise ConflictError("service %s is %s; wait until that is over (`aiportal service show %s`)"
                            % (name, svc.state.value.lower(), name))
    if weight is not None and not 1 <= weight <= 99:
        raise ValidationError("weight", "a gray release starts with a share of 1-99 %% of the requests (%d given); "
                                        "leave weight out for a rolling update" % weight)
    current = ServiceSpec.from_json(svc.spec)
    try:
        spec = ServiceSpec.from_json({**current.to_json(), **body})
    except ServiceSpecError as e:
        raise _invalid(e) from None
    except TypeError as e:
        raise ValidationError("body", str(e)) from None
    if spec == current:
        raise ConflictError("service %s already runs this spec (version %s); change something, e.g. the version"
                            % (name, current.version))
    owner = db.get(User, svc.user_id)
    _check_runs_here(db, settings, box, owner, spec)
    svc.next_generation, svc.next_spec_json = svc.generation + 1, json.dumps(spec.to_json())
    svc.next_weight = weight
    svc.state, svc.updated_at = ServiceState.UPDATING, utcnow()
    svc.message = ("gray release of version %s: %d%% of the requests" % (spec.version, weight) if weight is not None
                   else "rolling update to version %s" % spec.version)
    db.add(svc)
    db.commit()
    log.info("service %s: %s (generation %d)", name, svc.message, svc.next_generation)
    return svc


def _reweigh(db: Session, svc: Service, weight: int | None) -> Service:
    """Change the share of a gray release under way: 100 rolls the new version out, 0 stops it."""
    if weight is None:
        raise ValidationError("body", "give the fields to change, e.g. version and model")
    if svc.state is not ServiceState.UPDATING or svc.next_weight is None:
        raise ConflictError("service %s has no gray release under way; start one with the new version's fields and "
                            "a weight (`aiportal service update %s --version V --weight 10`)" % (svc.name, svc.name))
    version = json.loads(svc.next_spec_json).get("version")
    if weight == 0:
        svc.next_generation, svc.next_spec_json, svc.next_weight = None, None, None
        svc.state, svc.message = ServiceState.RUNNING, "gray release of version %s stopped" % version
    elif weight == 100:
        svc.next_weight, svc.message = None, "rolling update to version %s" % version
    else:
        svc.next_weight, svc.message = weight, "gray release of version %s: %d%% of the requests" % (version, weight)
    svc.updated_at = utcnow()
    db.add(svc)
    db.commit()
    log.info("service %s: %s", svc.name, svc.message)
    return svc


def delete(db: Session, user: User, name: str) -> Service:
    svc = get_service(db, user, name)
    svc.state, svc.updated_at = ServiceState.DELETING, utcnow()
    db.add(svc)
    db.commit()
    return svc


def public(svc: Service, replicas: list[ServiceReplica] | None = None, owner: str | None = None) -> dict[str, Any]:
    out = {
        "id": svc.id, "name": svc.name, "owner": owner, "state": svc.state.value, "url": "/service/%s" % svc.name,
        "spec": svc.spec, "generation": svc.generation, "version": svc.spec.get("version"),
        "next_spec": json.loads(svc.next_spec_json) if svc.next_spec_json else None,
        "next_weight": svc.next_weight,
        "min_replicas": svc.min_replicas, "max_replicas": svc.max_replicas, "desired_replicas": svc.desired,
        "target_inflight": svc.target_inflight, "scale_down_delay_s": svc.scale_down_delay_s,
        "message": svc.message, "created_at": svc.created_at.isoformat(), "updated_at": svc.updated_at.isoformat(),
    }
    if replicas is not None:
        out["ready_replicas"] = sum(1 for r in replicas if r.phase is Phase.READY)
        out["replicas"] = [public_replica(r) for r in replicas]
    return out


def public_replica(r: ServiceReplica) -> dict[str, Any]:
    iso = lambda t: t.isoformat() if t else None  # noqa: E731
    return {"id": r.id, "phase": r.phase.value, "version": r.version, "generation": r.generation,
            "slurm_job_id": r.slurm_job_id, "host": r.host, "port": r.port,
            "avg_inflight": None if r.avg_inflight is None else round(r.avg_inflight, 3), "message": r.message,
            "created_at": iso(r.created_at), "ready_at": iso(r.ready_at), "ended_at": iso(r.ended_at)}


def open_key(box: SecretBox, svc: Service) -> str | None:
    """The service's key in clear; None for a service from before keys."""
    if not svc.key_sealed:
        return None
    return box.open(svc.key_sealed, "the key of service %r" % svc.name)


# -- folders ---------------------------------------------------------------------------------

def _own(path: Path, pw) -> None:
    if os.geteuid() == 0:
        os.chown(path, pw.pw_uid, pw.pw_gid)


def prepare_service_dir(settings: Settings, unix_user: str, service_dir: Path) -> None:
    """The service's folder, private to its user (the portal reads it as root)."""
    pw = pwd.getpwnam(unix_user)
    (Path(settings.shared_root) / "services").mkdir(mode=0o755, exist_ok=True)
    for d in (service_dir, service_dir / "replicas"):
        d.mkdir(mode=0o700, exist_ok=True)
        _own(d, pw)


def _install_runtime(service_dir: Path, pw) -> Path:
    """A copy of the serving runtime in the service's folder (replicas bind it read-only); a
    new portal version's runtime reaches new replicas."""
    dest = service_dir / "runtime.py"
    src = Path(inference.runtime.__file__)
    if not dest.exists() or dest.read_bytes() != src.read_bytes():
        tmp = service_dir / ".runtime.py.tmp"
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        _own(tmp, pw)
        os.replace(tmp, dest)
    return dest


def write_runtime_config(path: Path, pw, config: Mapping[str, Any]) -> None:
    """The replica's runtime.json: mode 0600 from its creation (it holds the service's key),
    owned by the user, written whole (temporary file + rename)."""
    tmp = path.with_name(".%s.tmp" % path.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)        # an older file of that name kept its mode
        json.dump(config, f, indent=1)
    _own(tmp, pw)
    os.replace(tmp, path)


def prepare_replica_dir(settings: Settings, unix_user: str, service_dir: Path, replica_id: str) -> Path:
    pw = pwd.getpwnam(unix_user)
    prepare_service_dir(settings, unix_user, service_dir)
    job_dir = service_dir / "replicas" / replica_id
    for d in (job_dir, job_dir / "data", job_dir / "output", job_dir / "logs", job_dir / "run"):
        d.mkdir(mode=0o700, exist_ok=True)
        _own(d, pw)
    return job_dir


# -- the controller --------------------------------------------------------------------------

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
            runtime_path = _install_runtime(Path(svc.service_dir), pw)
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


# -- the router's view of the database ------------------------------------------------------

RouteRow = tuple[str, int, int, list[tuple[str, str, int, str, int]], str | None]


def routing_table(db: Session) -> dict[str, RouteRow]:
    """Every service by name: (id, owner user id, max body bytes, ready replicas as
    (id, host, port, version, weight), sealed key or None). One query for services, one for
    ready replicas. In a gray release the next generation's replicas weigh ``next_weight``,
    the others the rest; otherwise every replica weighs 100. The router opens the keys."""
    services = {s.id: s for s in db.exec(select(Service).where(Service.state != ServiceState.DELETING))}
    ready: dict[str, list] = {sid: [] for sid in services}
    for r in db.exec(select(ServiceReplica).where(ServiceReplica.phase == Phase.READY)):
        svc = services.get(r.service_id)
        if svc is not None and r.host and r.port:
            weight = 100
            if svc.next_weight is not None:
                weight = svc.next_weight if r.generation == svc.next_generation else 100 - svc.next_weight
            ready[r.service_id].append((r.id, r.host, r.port, r.version, weight))
    return {s.name: (s.id, s.user_id, int(s.spec.get("max_body_bytes") or 0), ready[s.id], s.key_sealed)
            for s in services.values()}
