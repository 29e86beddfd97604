"""Registries: users' accounts (checked at once, sealed), the site's base images, and pinning a
``docker://`` reference to the digest a job will run.

* An account is checked against the registry before it is stored (``GET /v2/``): a wrong
  password is a 422 naming ``password``, an unreachable registry a 503. The password is sealed
  with the site's data key (like data-source keys) and opened only to resolve a reference or to
  write a 0600 authfile for a pull or a push.
* :func:`pin` turns ``docker://HOST/REPO:TAG`` into ``docker://HOST/REPO@sha256:...`` with the
  user's account (the site's read account for the site's base images). Whatever cannot be read
  is refused before anything is stored: 422 naming the field.
* The SIF cache is shared, so a cached private image is handed out only to a user whose own
  account can read its manifest now (:func:`pin` checks; the answer is trusted for
  ``registry_access_ttl_s`` per user and digest). A user who cannot is told 403, naming the image,
  even when the exact digest is given.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlmodel import select

from containers.errors import ImageRefError
from containers.refs import ImageRef, RefKind, parse_image_ref
from containers.registry import (RegistryAuth, RegistryAuthError, RegistryClient, RegistryConfig, RegistryError,
                                 RegistryNotFound, RegistryUnavailable, check_host)
from portal.errors import NotFoundError, PortalError, ValidationError
from portal.models import RegistryCredential, utcnow
from portal.settings import Settings

log = logging.getLogger(__name__)

SITE_IMAGES_FORMAT = "aiportal-site-images/1"


class RegistryDown(PortalError):
    """A registry the request needs cannot be reached now (503): nothing was stored."""

    code = "registry_unavailable"
    status = 503


def config(settings: Settings) -> RegistryConfig:
    return RegistryConfig(insecure=frozenset(settings.registry_insecure), ca_file=settings.registry_ca_file,
                          timeout=settings.registry_timeout_s)


def normalise_host(text: str) -> str:
    """``HOST[:PORT]`` from what a user types (``https://`` and a trailing ``/`` are dropped)."""
    host = (text or "").strip()
    for prefix in ("https://", "http://", "docker://"):
        if host.lower().startswith(prefix):
            host = host[len(prefix):]
    host = host.rstrip("/")
    try:
        return check_host(host).lower()
    except ValueError as e:
        raise ValidationError("registry", str(e)) from None


def allowed_hosts(settings: Settings) -> list[str]:
    return sorted({settings.site_registry.lower(), *(h.lower() for h in settings.registries_allowed),
                   *(h.lower() for h in settings.registry_insecure)})


def check_allowed(settings: Settings, host: str, field: str) -> str:
    """``host`` when users may use it on this site; else a 422 naming ``field`` (the portal
    never connects to a host a user names unless the site allows it)."""
    allowed = allowed_hosts(settings)
    if host.lower() not in allowed:
        raise ValidationError(field, "registry %s is not one this site uses; allowed: %s (an admin adds others "
                                     "with registries_allowed in site.toml)" % (host, ", ".join(allowed)))
    return host


# -- accounts -----------------------------------------------------------------------------------

def login(db, settings: Settings, box, user, registry: str, username: str, password: str) -> RegistryCredential:
    """Check ``username``/``password`` at ``registry`` and store them sealed (replacing the
    user's earlier account there)."""
    host = check_allowed(settings, normalise_host(registry), "registry")
    errors = {}
    if not username or len(username) > 255 or any(c.isspace() or not c.isprintable() for c in username):
        errors["username"] = "give the registry user name (printable, no spaces, at most 255 characters)"
    if not password or len(password) > 4096:
        errors["password"] = "give the password (or an access token) for %s" % host
    if errors:
        raise ValidationError.of(errors)
    try:
        RegistryClient(host, RegistryAuth(username, password), config(settings)).check_login()
    except RegistryAuthError:
        raise ValidationError("password", "%s refused user %r with this password; check both and try again"
                                          % (host, username)) from None
    except RegistryUnavailable as e:
        raise RegistryDown("%s; nothing was stored" % e) from None
    except RegistryError as e:
        raise ValidationError("registry", "%s; nothing was stored" % e) from None
    row = db.exec(select(RegistryCredential).where(RegistryCredential.user_id == user.id,
                                                   RegistryCredential.host == host)).first()
    if row is None:
        row = RegistryCredential(user_id=user.id, host=host, username=username, password_sealed="")
    row.username, row.password_sealed, row.checked_at = username, box.seal(password), utcnow()
    db.add(row)
    db.commit()
    db.refresh(row)
    forget_access(user.id)
    log.info("user %s added an account for registry %s", user.name, host)
    return row


def accounts(db, user) -> list[RegistryCredential]:
    return list(db.exec(select(RegistryCredential).where(RegistryCredential.user_id == user.id)
                        .order_by(RegistryCredential.host)))


def logout(db, user, registry: str) -> None:
    host = normalise_host(registry)
    row = db.exec(select(RegistryCredential).where(RegistryCredential.user_id == user.id,
                                                   RegistryCredential.host == host)).first()
    if row is None:
        raise NotFoundError("you have no account for registry %s" % host)
    db.delete(row)
    db.commit()
    forget_access(user.id)


def auth_for(db, box, user, host: str) -> RegistryAuth | None:
    """The user's account at ``host``, opened; None when they have none."""
    row = db.exec(select(RegistryCredential).where(RegistryCredential.user_id == user.id,
                                                   RegistryCredential.host == host)).first()
    if row is None:
        return None
    return RegistryAuth(row.username, box.open(row.password_sealed, "the registry password of %s at %s"
                                                % (user.name, host)))


def site_auth(settings: Settings) -> RegistryAuth | None:
    """The site's read account (it publishes the base images), or None when it has none."""
    try:
        password = Path(settings.site_registry_password_file).read_text().strip()
    except OSError:
        return None
    return RegistryAuth(settings.site_registry_user, password) if password else None


# -- site base images ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SiteImage:
    name: str
    ref: str             #: docker://HOST/site/NAME:TAG
    digest: str
    title: str
    description: str
    framework: str

    @property
    def pinned(self) -> str:
        return str(parse_image_ref(self.ref).pinned(self.digest))


def parse_site_images(text: str) -> list[SiteImage]:
    """The site-images document (``{"format": "aiportal-site-images/1", "images": [...]}``);
    entries that are not complete are skipped."""
    doc = json.loads(text)
    if not isinstance(doc, dict) or doc.get("format") != SITE_IMAGES_FORMAT:
        raise ValueError("not an %s document" % SITE_IMAGES_FORMAT)
    out = []
    for item in doc.get("images") or []:
        try:
            ref = parse_image_ref(item["ref"])
            if ref.kind is not RefKind.DOCKER:
                continue
            ref.pinned(item["digest"])
            out.append(SiteImage(str(item["name"]), str(ref), item["digest"], str(item.get("title") or item["name"]),
                                 str(item.get("description") or ""), str(item.get("framework") or "")))
        except (KeyError, TypeError, ValueError, ImageRefError):
            continue
    return out


_site_cache: dict[str, tuple[float, list[SiteImage]]] = {}


def site_images(settings: Settings) -> list[SiteImage]:
    """The site's base images (re-read when the file changes); [] when none are published."""
    path = Path(settings.site_images_file)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return []
    hit = _site_cache.get(str(path))
    if hit and hit[0] == mtime:
        return hit[1]
    try:
        images = parse_site_images(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("site images file %s cannot be read: %s", path, e)
        return []
    _site_cache[str(path)] = (mtime, images)
    return images


# -- pinning a reference ------------------------------------------------------------------------

@dataclass(frozen=True)
class Pinned:
    """A registry image at one digest, and the account that may read it (None: anonymous)."""

    ref: ImageRef
    auth: RegistryAuth | None


_access: dict[tuple[int, str], float] = {}
_access_lock = threading.Lock()


def _trusted(user_id: int, digest: str) -> bool:
    with _access_lock:
        return _access.get((user_id, digest), 0.0) > time.monotonic()


def _trust(settings: Settings, user_id: int, digest: str) -> None:
    with _access_lock:
        if len(_access) > 10000:
            now = time.monotonic()
            for k in [k for k, v in _access.items() if v <= now]:
                del _access[k]
        _access[(user_id, digest)] = time.monotonic() + settings.registry_access_ttl_s


def forget_access(user_id: int) -> None:
    """Drop what was trusted about ``user_id`` (their accounts changed)."""
    with _access_lock:
        for k in [k for k in _access if k[0] == user_id]:
            del _access[k]


def _account(db, settings: Settings, box, user, ref: ImageRef) -> RegistryAuth | None:
    auth = auth_for(db, box, user, ref.registry)
    if auth is None and ref.registry == settings.site_registry.lower() and ref.repository.startswith("site/"):
        auth = site_auth(settings)          # the site's base images: readable by every user
    return auth


def pin(db, settings: Settings, box, user, ref_text: str, field: str = "image") -> Pinned | None:
    """``docker://NAME[:TAG|@DIGEST]`` -> the same image pinned to its digest, checked readable
    with the user's account now; None for references that are not registry images.

    An image the user's account cannot read is a 422 naming ``field``, whether or not the SIF
    cache holds its digest (the cache does not hand it out, and the answer does not tell that
    someone ran it). An unreachable registry is a 503. Nothing is stored either way."""
    try:
        ref = parse_image_ref(ref_text)
    except ImageRefError:
        return None
    if ref.kind is not RefKind.DOCKER:
        return None
    for site in site_images(settings):
        if ref_text in (site.ref, site.pinned) or str(ref) in (site.ref, site.pinned):
            return Pinned(parse_image_ref(site.pinned), _account(db, settings, box, user, ref))
    check_allowed(settings, ref.registry, field)
    auth = _account(db, settings, box, user, ref)
    if ref.digest and _trusted(user.id, ref.digest):
        return Pinned(ref.pinned(ref.digest), auth)
    client = RegistryClient(ref.registry, auth, config(settings))
    try:
        digest = client.resolve(ref.repository, ref.reference)
    except (RegistryAuthError, RegistryNotFound) as e:
        hint = ("" if auth else "; if it is private, add your account: aiportal registry login %s" % ref.registry)
        raise ValidationError(field, "%s: %s%s" % (ref_text, e.reason, hint)) from None
    except RegistryUnavailable as e:
        raise RegistryDown("%s; nothing was submitted" % e) from None
    except RegistryError as e:
        raise ValidationError(field, "%s: %s" % (ref_text, e)) from None
    _trust(settings, user.id, digest)
    return Pinned(ref.pinned(digest), auth)


# -- what a form offers ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RepositoryTags:
    registry: str
    repository: str
    tags: tuple[str, ...]


def browse(db, settings: Settings, box, user, limit: int = 50) -> tuple[list[RepositoryTags], dict[str, str]]:
    """The repositories and tags the user can see in each registry they added; per registry
    that could not be listed, why (the form still works without them)."""
    out, problems = [], {}
    allowed = allowed_hosts(settings)
    for row in accounts(db, user):
        if row.host not in allowed:
            continue
        auth = RegistryAuth(row.username, box.open(row.password_sealed, "the registry password at %s" % row.host))
        client = RegistryClient(row.host, auth, config(settings))
        try:
            for repo in client.catalog(limit):
                try:
                    tags = client.tags(repo, limit)
                except RegistryNotFound:
                    tags = []
                out.append(RepositoryTags(row.host, repo, tuple(sorted(tags))))
        except (RegistryError, ValueError) as e:
            problems[row.host] = str(e)
    return out, problems
