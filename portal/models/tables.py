"""The portal's database tables (SQLModel), and the data models the API speaks.

Tables: users, projects (with members), API tokens (hashed), web sessions (hashed), login
failures (rate limits of logins and of wrong API tokens),
jobs, events (a job's timeline; node events for the cluster page), idempotency keys (the first
answer to a create request, for its retries), images, data sources
(keys sealed with the site's data key), inference services and their replicas. The schema is created and changed only by the Alembic
migrations in ``portal/migrations``; a test checks that they match these classes.

States are typed: a job's ``state`` is a :class:`slurm.states.JobState`, an image's an
:class:`ImageState`, stored as their names.
"""
from __future__ import annotations

import datetime as dt
import enum
import json
import uuid
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from inference.controller import Phase
from monitor.recovery import NodeCondition
from slurm.states import JobState


def utcnow() -> dt.datetime:
    """Aware UTC: SQLModel's datetime columns refuse naive values and give back UTC."""
    return dt.datetime.now(dt.timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


class ImageState(enum.Enum):
    PENDING = "PENDING"          #: registered, conversion not submitted yet
    CONVERTING = "CONVERTING"    #: a conversion job is queued or running
    READY = "READY"              #: the SIF is in the cache
    FAILED = "FAILED"            #: the conversion job failed (see message)


class BuildState(enum.Enum):
    PENDING = "PENDING"          #: the build job waits in the queue
    RUNNING = "RUNNING"          #: buildah runs (then pushes)
    PUSHED = "PUSHED"            #: built and pushed; ``digest`` is the pushed manifest
    FAILED = "FAILED"            #: the build or the push failed (see message and log)
    CANCELLED = "CANCELLED"      #: cancelled by its owner or an admin

    @property
    def terminal(self) -> bool:
        return self in (BuildState.PUSHED, BuildState.FAILED, BuildState.CANCELLED)


class EventKind(enum.Enum):
    SUBMITTED = "submitted"      #: accepted by Slurm
    STATE = "state"              #: a job's state changed (pending with reason, running on node, ...)
    REQUEUED = "requeued"
    FINISHED = "finished"        #: terminal state, with exit code
    CANCEL = "cancel"            #: a user asked to cancel
    SUBMIT_FAILED = "submit_failed"
    DRAIN = "drain"
    RESUME = "resume"
    NODE_DOWN = "node_down"
    STAGE_OUT = "stage_out"      #: finishing a pending stage-out: requested, finished, failed; its credentials removed


def _enum(cls: type[enum.Enum]) -> sa.Enum:
    # stored as the member name in a VARCHAR (no native enum type: migrations stay simple)
    return sa.Enum(cls, native_enum=False, create_constraint=False, length=32)


class User(SQLModel, table=True):
    __tablename__ = "users"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, sa_column_kwargs={"unique": True})
    unix_user: str = Field(max_length=32)
    password_hash: str | None = Field(default=None, max_length=255)
    #: where health and recovery notifications go (else UNIXUSER@notify_email_domain, if set)
    email: str | None = Field(default=None, max_length=254)
    is_admin: bool = False
    disabled: bool = False
    created_at: dt.datetime = Field(default_factory=utcnow)


class Project(SQLModel, table=True):
    __tablename__ = "projects"
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, sa_column_kwargs={"unique": True})
    description: str = Field(default="", max_length=500)
    #: Slurm account the project's jobs are charged to (``--account``), if the site uses them
    slurm_account: str | None = Field(default=None, max_length=64)
    created_at: dt.datetime = Field(default_factory=utcnow)


class ProjectMember(SQLModel, table=True):
    __tablename__ = "project_members"
    project_id: int = Field(foreign_key="projects.id", primary_key=True)
    user_id: int = Field(foreign_key="users.id", primary_key=True)


class ApiToken(SQLModel, table=True):
    """An API token: only its sha256 is kept; the clear token is shown once, at creation."""

    __tablename__ = "api_tokens"
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", index=True)
    name: str = Field(default="", max_length=64)
    token_sha256: str = Field(max_length=64, sa_column_kwargs={"unique": True})
    #: the first characters of the token, to tell tokens apart in listings
    prefix: str = Field(max_length=16)
    created_at: dt.datetime = Field(default_factory=utcnow)
    last_used_at: dt.datetime | None = None
    expires_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None
    #: what it may do (:mod:`portal.scopes`), space-separated; "" = the account's full access
    scopes: str = Field(default="", max_length=256)
    #: the one service it may call (an invoke key); its id, so a later service of that name is not it
    service_id: str | None = Field(default=None, max_length=36)


class WebSession(SQLModel, table=True):
    """A logged-in browser. The cookie holds the session's random id; only its sha256 is kept.
    Logging out deletes the row; so do "log out everywhere", a password change (the account's
    other sessions) and the idle and absolute timeouts (``session_idle_s``, ``session_max_age_s``)."""

    __tablename__ = "web_sessions"
    id: int | None = Field(default=None, primary_key=True)
    id_sha256: str = Field(max_length=64, sa_column_kwargs={"unique": True})
    user_id: int = Field(foreign_key="users.id", index=True)
    created_at: dt.datetime = Field(default_factory=utcnow)
    #: updated at most once a minute (no write per request)
    last_seen_at: dt.datetime = Field(default_factory=utcnow)
    #: the client address and user agent it was opened from (to tell sessions apart)
    address: str = Field(default="", max_length=64)
    user_agent: str = Field(default="", max_length=128)


class LoginFailure(SQLModel, table=True):
    """A failed login (keys ``name:NAME``, ``addr:ADDRESS``) or a wrong API token (key
    ``token:ADDRESS``), kept for the rate limits."""

    __tablename__ = "login_failures"
    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(max_length=128, index=True)
    at: dt.datetime = Field(default_factory=utcnow, index=True)


class Job(SQLModel, table=True):
    """A training job: what was asked (request), what Slurm says (state, nodes, exit code)."""

    __tablename__ = "jobs"
    __table_args__ = (sa.Index("ix_jobs_user_created", "user_id", "created_at"),)
    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    user_id: int = Field(foreign_key="users.id", index=True)
    project_id: int | None = Field(default=None, foreign_key="projects.id")
    name: str = Field(max_length=128)
    state: JobState = Field(default=JobState.SUBMITTING, sa_type=_enum(JobState), index=True)
    slurm_job_id: str | None = Field(default=None, max_length=32, index=True)
    #: submitted with plain sbatch, found by the reconciler
    external: bool = False
    node_type: str = Field(default="", max_length=32)
    partition: str = Field(default="", max_length=64)
    gpus: int = 0
    image: str = Field(default="", max_length=1024)
    #: the request as JSON (command, inputs, output, env, time limit, sweep): to show and resubmit
    request_json: str = Field(default="{}", sa_type=sa.Text)
    script: str = Field(default="", sa_type=sa.Text)
    job_dir: str = Field(default="", max_length=1024)
    reason: str = Field(default="", max_length=1024)
    nodes: str = Field(default="", max_length=1024)
    exit_code: int | None = None
    signal: int | None = None
    restarts: int = 0
    created_at: dt.datetime = Field(default_factory=utcnow, index=True)
    submitted_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    ended_at: dt.datetime | None = None
    updated_at: dt.datetime = Field(default_factory=utcnow)
    #: a stage-out that could not finish, else null: its records (where the outputs were kept) and
    #: the last attempt to finish it from the portal (:class:`portal.models.stage_out.PendingStageOut`)
    stage_out_pending: str | None = Field(default=None, sa_type=sa.Text)

    @property
    def request(self) -> dict[str, Any]:
        return json.loads(self.request_json or "{}")


class IdempotencyKey(SQLModel, table=True):
    """An ``Idempotency-Key`` a user sent with a create request (``POST /jobs``, ``POST
    /services``): the first answer, replayed to every retry with the same key for 24 hours.

    The row is committed before the request does anything, and reserves ``resource_id``, the id
    the job or service it creates gets; so whatever happens to the request, a retry finds what
    it made (or that it made nothing) and never makes a second one. ``status`` is null while
    no answer was recorded: the request is in flight since ``claimed_at``, or died."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (sa.UniqueConstraint("user_id", "key", name="uq_idempotency_keys_user_key"),)
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id")
    #: as the client sent it (not a secret: it names a request, it grants nothing)
    key: str = Field(max_length=255)
    #: sha256 of the method, path and JSON body: the same key with another request is refused
    request_sha256: str = Field(max_length=64)
    #: the id of the job or service this request creates (reserved before it is stored)
    resource_id: str = Field(default_factory=new_id, max_length=36)
    #: when the request now running it began (a retry takes over once it is long past)
    claimed_at: dt.datetime = Field(default_factory=utcnow)
    status: int | None = None
    answer_json: str | None = Field(default=None, sa_type=sa.Text)
    location: str | None = Field(default=None, max_length=255)
    created_at: dt.datetime = Field(default_factory=utcnow)
    expires_at: dt.datetime = Field(index=True)


class Event(SQLModel, table=True):
    """Something that happened to a job or a node: the job timeline and the cluster log.

    Health and recovery events are also an outbox (``portal/services/notify.py``): ``notify_after`` set
    means "tell the owner, not before then"; a notifier claims a row (``notify_claim`` with a
    lease ``notify_claimed_until``) with one conditional UPDATE, so two monitors never both send
    it; ``notified_at`` is set once every channel took it (``notify_done`` lists those that did).
    ``key`` is unique: the monitor records each requeue or node failure of a job once, whoever
    sees it first."""

    __tablename__ = "events"
    __table_args__ = (sa.Index("ix_events_job_at", "job_id", "at"), sa.Index("ux_events_key", "key", unique=True))
    id: int | None = Field(default=None, primary_key=True)
    at: dt.datetime = Field(default_factory=utcnow, index=True)
    kind: EventKind = Field(sa_type=_enum(EventKind))
    job_id: str | None = Field(default=None, foreign_key="jobs.id")
    node: str | None = Field(default=None, max_length=64, index=True)
    user_id: int | None = Field(default=None, foreign_key="users.id")
    state: JobState | None = Field(default=None, sa_type=_enum(JobState))
    message: str = Field(default="", max_length=2000)
    notified_at: dt.datetime | None = None
    notify_attempts: int = 0
    key: str | None = Field(default=None, max_length=160)
    notify_after: dt.datetime | None = Field(default=None, index=True)
    notify_claim: str | None = Field(default=None, max_length=36)
    notify_claimed_until: dt.datetime | None = None
    notify_done: str = Field(default="", max_length=64)
    notify_error: str = Field(default="", max_length=500)


class NodeRecord(SQLModel, table=True):
    """The last condition the monitor (or an admin action) recorded for a node; changed only
    by compare-and-set, so each change becomes exactly one event."""

    __tablename__ = "node_records"
    name: str = Field(primary_key=True, max_length=64)
    condition: NodeCondition = Field(sa_type=_enum(NodeCondition))
    reason: str = Field(default="", max_length=1024)
    since: dt.datetime = Field(default_factory=utcnow)
    updated_at: dt.datetime = Field(default_factory=utcnow)


class Image(SQLModel, table=True):
    """An image a user registered: a reference, converted once into the shared SIF cache."""

    __tablename__ = "images"
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", index=True)
    ref: str = Field(max_length=1024)
    digest: str = Field(default="", max_length=80)
    sif_path: str = Field(default="", max_length=1024)
    state: ImageState = Field(default=ImageState.PENDING, sa_type=_enum(ImageState))
    conversion_job_id: str | None = Field(default=None, max_length=32)
    message: str = Field(default="", max_length=2000)
    created_at: dt.datetime = Field(default_factory=utcnow)
    updated_at: dt.datetime = Field(default_factory=utcnow)


class RegistryCredential(SQLModel, table=True):
    """A user's account at an OCI registry (``host`` is host[:port]). The password is sealed with the
    site's data key (:class:`storage.credentials.SecretBox`), like data-source keys."""

    __tablename__ = "registry_credentials"
    __table_args__ = (sa.UniqueConstraint("user_id", "host", name="uq_registry_credentials_user_host"),)
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", index=True)
    host: str = Field(max_length=255)   #: the registry, host[:port]
    username: str = Field(max_length=255)
    password_sealed: str = Field(sa_type=sa.Text)
    created_at: dt.datetime = Field(default_factory=utcnow)
    checked_at: dt.datetime = Field(default_factory=utcnow)


class ImageBuild(SQLModel, table=True):
    """A Dockerfile build: a Slurm job that runs buildah as the user, then pushes ``tag``."""

    __tablename__ = "image_builds"
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", index=True)
    tag: str = Field(max_length=1024)
    digest: str = Field(default="", max_length=80)
    state: BuildState = Field(default=BuildState.PENDING, sa_type=_enum(BuildState))
    slurm_job_id: str | None = Field(default=None, max_length=32)
    build_dir: str = Field(default="", max_length=1024)
    log_path: str = Field(default="", max_length=1024)
    message: str = Field(default="", max_length=2000)
    created_at: dt.datetime = Field(default_factory=utcnow)
    updated_at: dt.datetime = Field(default_factory=utcnow)
    ended_at: dt.datetime | None = None


class DataSourceRecord(SQLModel, table=True):
    """A user's S3-compatible data source. Both keys are sealed with the site's data key
    (:class:`storage.credentials.SecretBox`); only a masked access key is kept in clear."""

    __tablename__ = "datasources"
    __table_args__ = (sa.UniqueConstraint("user_id", "name", name="uq_datasources_user_name"),)
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", index=True)
    name: str = Field(max_length=64)
    endpoint: str = Field(max_length=1024)
    region: str = Field(default="us-east-1", max_length=64)
    buckets_json: str = Field(default="[]", max_length=2000)
    bandwidth_mbps: float | None = None
    workers: int | None = None
    access_key_sealed: str = Field(sa_type=sa.Text)
    secret_key_sealed: str = Field(sa_type=sa.Text)
    access_key_hint: str = Field(default="", max_length=16)
    created_at: dt.datetime = Field(default_factory=utcnow)


class ServiceState(enum.Enum):
    RUNNING = "RUNNING"          #: replicas are kept between min and max
    UPDATING = "UPDATING"        #: a rolling update to ``next_generation`` is under way
    DELETING = "DELETING"        #: its replicas are being stopped; the row goes when none is left


class Service(SQLModel, table=True):
    """An inference service: ``spec_json`` is what generation ``generation`` runs
    (:class:`inference.service.ServiceSpec`); a rolling update carries the next one."""

    __tablename__ = "services"
    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    user_id: int = Field(foreign_key="users.id", index=True)
    #: unique on the site: it is the URL /service/NAME
    name: str = Field(max_length=48, sa_column_kwargs={"unique": True})
    state: ServiceState = Field(default=ServiceState.RUNNING, sa_type=_enum(ServiceState))
    generation: int = 1
    spec_json: str = Field(sa_type=sa.Text)
    next_generation: int | None = None
    next_spec_json: str | None = Field(default=None, sa_type=sa.Text)
    #: gray release: the next generation runs beside this one and takes this % of requests
    next_weight: int | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    #: callable without a token (its owner's choice; a rate limit per client address holds it)
    public: bool = False
    #: the replica count the autoscaler wants now (between min and max)
    desired: int = 1
    target_inflight: float = 4.0
    scale_down_delay_s: float = 60.0
    low_since: dt.datetime | None = None
    failures: int = 0
    last_failure_at: dt.datetime | None = None
    #: the last rollout's outcome, or why replicas fail to start
    message: str = Field(default="", max_length=2000)
    service_dir: str = Field(default="", max_length=1024)
    #: the key replicas take requests with (header X-Aiportal-Key), sealed with the site's data
    #: key; only the router and the replicas' runtime.json see it in clear. NULL: a service from
    #: before keys, whose replicas answer without one
    key_sealed: str | None = Field(default=None, sa_type=sa.Text)
    created_at: dt.datetime = Field(default_factory=utcnow)
    updated_at: dt.datetime = Field(default_factory=utcnow)

    @property
    def spec(self) -> dict[str, Any]:
        return json.loads(self.spec_json or "{}")


class ServiceReplica(SQLModel, table=True):
    """One replica: a Slurm job running the serving runtime; ``host``/``port`` come from the
    ``endpoint.json`` it wrote (read again after a portal restart)."""

    __tablename__ = "service_replicas"
    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    service_id: str = Field(foreign_key="services.id", index=True, max_length=36)
    generation: int = 1
    version: str = Field(default="", max_length=64)
    phase: Phase = Field(default=Phase.PENDING, sa_type=_enum(Phase), index=True)
    slurm_job_id: str | None = Field(default=None, max_length=32)
    job_dir: str = Field(default="", max_length=1024)
    host: str | None = Field(default=None, max_length=255)
    port: int | None = None
    probe_failures: int = 0
    cancel_requested: bool = False
    last_inflight_seconds: float | None = None
    last_sample_at: dt.datetime | None = None
    avg_inflight: float | None = None
    message: str = Field(default="", max_length=2000)
    created_at: dt.datetime = Field(default_factory=utcnow)
    started_at: dt.datetime | None = None
    ready_at: dt.datetime | None = None
    unhealthy_since: dt.datetime | None = None
    draining_since: dt.datetime | None = None
    ended_at: dt.datetime | None = None
