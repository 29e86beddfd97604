"""Accounts' models: the caller (``GET /me``), API tokens (create, public, created once), web
sessions (public, ended) and projects (create, public)."""
from __future__ import annotations

from pydantic import ConfigDict, Field, field_validator
from sqlmodel import SQLModel

from portal.models.common import OptionalTimestamp, Timestamp
from portal.models.tables import ApiToken, Project, WebSession


class Me(SQLModel):
    name: str
    unix_user: str
    is_admin: bool
    projects: list[str]


class TokenCreate(SQLModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(default="", description="a label to tell tokens apart (its first 64 characters are kept)")
    expires_days: int | None = Field(default=None, ge=1, le=3650, description="days until it expires (none: never)")
    scopes: list[str] | None = Field(default=None, min_length=1, description=(
        "what it may do (jobs:read, jobs:write, services:invoke, services:manage, data:read, data:write, admin); "
        "none: the account's full access"))
    service: str | None = Field(default=None, description=(
        "the name of one of your services: the token may call only that one (an invoke key; scopes default "
        "to services:invoke)"))

    @field_validator("name")
    @classmethod
    def _label(cls, v: str) -> str:
        return v[:64]


class TokenPublic(SQLModel):
    """A token as listed: never the token itself, only its first characters."""

    id: int
    name: str
    prefix: str
    created_at: Timestamp
    last_used_at: OptionalTimestamp = None
    expires_at: OptionalTimestamp = None
    revoked: bool
    scopes: list[str] | None = Field(default=None, description="what it may do; null: the account's full access")
    service_id: str | None = Field(default=None, description="the one service it may call (an invoke key)")

    @classmethod
    def of(cls, t: ApiToken) -> "TokenPublic":
        return cls(id=t.id, name=t.name, prefix=t.prefix, created_at=t.created_at, last_used_at=t.last_used_at,
                   expires_at=t.expires_at, revoked=t.revoked_at is not None,
                   scopes=t.scopes.split() if t.scopes else None, service_id=t.service_id)


class TokenList(SQLModel):
    tokens: list[TokenPublic]


class TokenCreated(SQLModel):
    """The answer to creating a token: the only time the token is shown."""

    id: int
    token: str
    prefix: str
    message: str = "copy the token now: it is not shown again"


class SessionPublic(SQLModel):
    """A logged-in browser of the caller's (never its id: only the server's own number)."""

    id: int
    created_at: Timestamp
    last_seen_at: Timestamp = Field(description="updated at most once a minute")
    address: str = Field(description="the client address it logged in from")
    user_agent: str = Field(description="the browser it logged in with (its first 128 characters)")
    current: bool = Field(description="the session this request came with")

    @classmethod
    def of(cls, s: WebSession, current: bool = False) -> "SessionPublic":
        return cls(id=s.id, created_at=s.created_at, last_seen_at=s.last_seen_at, address=s.address,
                   user_agent=s.user_agent, current=current)


class SessionList(SQLModel):
    sessions: list[SessionPublic]


class SessionsEnded(SQLModel):
    """The answer to "log out everywhere"."""

    ended: int = Field(description="how many web sessions ended (API tokens are not touched)")


class ProjectCreate(SQLModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(description="lower-case letters, digits, '.', '_', '-'")
    description: str = ""
    slurm_account: str | None = Field(default=None, description="the Slurm account its jobs are charged to")


class ProjectPublic(SQLModel):
    name: str
    description: str
    slurm_account: str | None

    @classmethod
    def of(cls, p: Project) -> "ProjectPublic":
        return cls(name=p.name, description=p.description, slurm_account=p.slurm_account)
