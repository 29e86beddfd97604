"""Inference services in the database: the use cases the API, the CLI and the Services page
call (deploy, list, show, scale, update: a rolling update or a gray release, delete). A request
only changes the service's row; the controller (:mod:`portal.daemons.controller`, one step of
every ``aiportal reconcile`` cycle) does the rest.

Keys: each service gets a random key at deploy time, stored sealed with the site's data key
(``Service.key_sealed``). It reaches a replica only in its ``runtime.json`` (mode 0600, the
user's), and the router and the probes send it (``X-Aiportal-Key``): replicas answer nobody
else. It is never logged, never in a batch script, never in an API answer.
"""
from __future__ import annotations

import json
import logging
import re
import secrets
from pathlib import Path
from typing import Any, Mapping

from sqlmodel import Session, select

from inference.controller import Phase
from inference.errors import ServiceSpecError
from inference.service import ScalePolicy, ServiceSpec, check_name, replica_job
from portal.errors import ConflictError, NotFoundError, ValidationError
from portal.models.services import ServiceCreate, ServiceScale, ServiceUpdate
from portal.models import Service, ServiceReplica, ServiceState, User, new_id, utcnow
from portal.services import datasources
from portal.services.job_data import check_job_data
from portal.services.service_dirs import prepare_service_dir
from portal.settings import Settings
from slurm.errors import SpecError
from slurm.render import COMMENT_PREFIX
from slurm.spec import resolve_node_type
from storage.credentials import SecretBox
from storage.errors import StorageError

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
    spec_body = {k: v for k, v in body.items() if k not in POLICY_FIELDS + ("name", "replicas", "public")}
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
    from portal.services.images import unreadable_image, user_can_read
    # one question, asked as the user: a missing file and another user's answer alike
    if not user_can_read(user.unix_user, spec.image):
        raise unreadable_image("image", spec.image, user.unix_user)
    try:
        check_job_data(settings, user.unix_user, [spec.model], None, datasources.sources_of(db, box, user))
    except StorageError as e:
        raise ValidationError("model", str(e)) from None


# -- use cases -------------------------------------------------------------------------------

def _registry_image(db: Session, settings: Settings, box: SecretBox, user: User, body: dict, backend) -> dict:
    """A ``docker://`` image becomes the SIF of its digest (pinned with the owner's account).
    One that is not converted yet gets its conversion job, and a 409 to deploy again when ready."""
    image = body.get("image")
    if not (isinstance(image, str) and image.startswith("docker://")):
        return body
    from portal.services import images
    pinned, auth = images.pin_image(db, settings, box, user, image)
    if backend is None:
        raise ValidationError("image", "registry images are deployed through the API, the CLI or the page")
    req = images.request_image(settings, backend, pinned, user=user.unix_user, auth=auth)
    if req.conversion_job:
        raise ConflictError("image %s (%s) is being converted to a SIF by Slurm job %s (small images: seconds; "
                            "large: minutes); deploy again when `aiportal image check %s` says ready"
                            % (image, pinned, req.conversion_job, image))
    return {**body, "image": str(req.sif)}


def deploy(db: Session, settings: Settings, box: SecretBox, user: User, create: ServiceCreate,
           backend=None, service_id: str | None = None) -> Service:
    """Check and store a service (its replicas are the controller's). ``service_id``: the id an
    ``Idempotency-Key`` reserved for it (default: a fresh uuid)."""
    body = _registry_image(db, settings, box, user, create.model_dump(exclude_unset=True), backend)
    name, spec, policy = parse_deploy(body)
    if db.exec(select(Service).where(Service.name == name)).first() is not None:
        raise ConflictError("a service named %r exists (service names are the URL /service/NAME, unique on "
                            "the site); pick another name, or `aiportal service update %s`" % (name, name))
    _check_runs_here(db, settings, box, user, spec)
    svc = Service(id=service_id or new_id(), user_id=user.id, name=name, spec_json=json.dumps(spec.to_json()),
                  min_replicas=policy.min_replicas, max_replicas=policy.max_replicas,
                  desired=policy.min_replicas, target_inflight=float(policy.target_inflight),
                  scale_down_delay_s=float(policy.scale_down_delay_s), public=bool(create.public),
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
        raise NotFoundError.of("service %r" % name, "`aiportal service list`")
    return svc


def replicas_of(db: Session, svc: Service, include_ended: bool = False) -> list[ServiceReplica]:
    q = select(ServiceReplica).where(ServiceReplica.service_id == svc.id)
    if not include_ended:
        q = q.where(ServiceReplica.phase != Phase.ENDED)
    return list(db.exec(q.order_by(ServiceReplica.created_at)))


def replica_log(db: Session, user: User, name: str, replica: str) -> tuple[ServiceReplica, str, str]:
    """A replica of the caller's service, its owner's Unix account and its log file (Slurm's
    output, in the replica's job folder). ``replica``: its id, or its number in the order
    `aiportal service show` lists them (0 the oldest; ended replicas are counted after)."""
    svc = get_service(db, user, name)
    live = replicas_of(db, svc)
    every = live + [r for r in replicas_of(db, svc, include_ended=True) if r.phase is Phase.ENDED]
    if re.fullmatch(r"[0-9]{1,9}", replica):
        rep = every[int(replica)] if int(replica) < len(every) else None
    else:       # its id, or the start of it that `aiportal service show` prints (unique, 4 characters or more)
        found = [r for r in every if r.id == replica or (len(replica) >= 4 and r.id.startswith(replica))]
        rep = found[0] if len(found) == 1 else None
    if rep is None:
        raise NotFoundError("service %s has no replica %r; it has %d (numbers 0-%d, or the ids in `aiportal service "
                            "show %s`)" % (name, replica, len(every), max(len(every) - 1, 0), name))
    if not rep.slurm_job_id or not rep.job_dir:
        raise NotFoundError("replica %s of service %s has no log yet (it has not reached Slurm)" % (rep.id, name))
    owner = db.get(User, svc.user_id)
    return rep, owner.unix_user, "%s/logs/slurm-%s.out" % (rep.job_dir, rep.slurm_job_id)


def replica_over(db: Session, replica_id: str) -> bool:
    rep = db.get(ServiceReplica, replica_id)
    return rep is None or rep.phase is Phase.ENDED


def set_access(db: Session, user: User, name: str, public: bool) -> Service:
    """Make a service callable without a token (``public``) or only with one (the router sees it
    within ``router_refresh_s``)."""
    svc = get_service(db, user, name)
    if svc.state is ServiceState.DELETING:
        raise ConflictError("service %s is being deleted" % name)
    if svc.public != public:
        svc.public = public
        svc.updated_at = utcnow()
        db.add(svc)
        db.commit()
        log.info("service %s made %s by %s", name, "public" if public else "private", user.name)
    return svc


def scale(db: Session, user: User, name: str, change: ServiceScale) -> Service:
    body = change.model_dump(exclude_unset=True)
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


def update(db: Session, settings: Settings, box: SecretBox, user: User, name: str, change: ServiceUpdate,
           backend=None) -> Service:
    """Start a new version: a rolling update to the spec with the fields given changed, or with
    ``weight`` (1-99) a gray release that runs it beside the current one for that share of the
    requests. ``weight`` alone changes a gray release under way: 100 rolls it out, 0 stops it."""
    body = change.model_dump(exclude_unset=True)
    svc = get_service(db, user, name)
    if not isinstance(body, Mapping) or not body:
        raise ValidationError("body", "give the fields to change, e.g. version and model (and weight for a gray "
                                      "release)")
    body = _registry_image(db, settings, box, db.get(User, svc.user_id), dict(body), backend)
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


def open_key(box: SecretBox, svc: Service) -> str | None:
    """The service's key in clear; None for a service from before keys."""
    if not svc.key_sealed:
        return None
    return box.open(svc.key_sealed, "the key of service %r" % svc.name)


