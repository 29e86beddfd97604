"""OCI/Docker registries: the HTTP API v2 client and the credentials file tools read.

:class:`RegistryClient` speaks the distribution API (https://distribution.github.io/distribution/spec/api/)
for what the portal needs before a job runs: check an account (``GET /v2/``), resolve a tag to
its manifest digest (``HEAD /v2/REPO/manifests/REF``), check that an account can read a manifest
now, list repositories (``/v2/_catalog``) and tags. Pulls and pushes are left to apptainer,
skopeo and buildah, which read :func:`write_authfile`'s file (``--authfile``).

Authentication: HTTP Basic (distribution's htpasswd) and the token flow (``WWW-Authenticate:
Bearer realm=...,service=...,scope=...``; Docker Hub, Harbor, GitLab), answered with the same
account. TLS is verified with the system's trust store or ``RegistryConfig.ca_file``; hosts in
``RegistryConfig.insecure`` are spoken to over plain HTTP (for sites that need it). Redirects
are not followed (credentials never go to another host).

Errors: :class:`RegistryAuthError` (401/403: wrong account or no permission),
:class:`RegistryNotFound` (no such repository or tag), :class:`RegistryUnavailable` (not
reachable, timed out, 5xx). Each names the host and what to do.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from containers.errors import ContainerError

#: Manifest media types a HEAD/GET asks for (the registry answers the one it has, and its digest).
MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                   r"|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?")
#: a registry host as the API's document states it (HOST or HOST:PORT)
HOST_PATTERN = _HOST.pattern
_REPO = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_TAG_OR_DIGEST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|sha256:[0-9a-f]{64}")
_MAX_LIST = 10000


class RegistryError(ContainerError):
    """A registry refused or failed a request; ``host`` names it."""

    code = "registry_error"

    def __init__(self, host: str, message: str):
        self.host = host
        self.reason = message
        super().__init__("registry %s: %s" % (host, message))


class RegistryAuthError(RegistryError):
    """401/403: the account is wrong, or it may not read (or list) what was asked."""

    code = "registry_unauthorized"


class RegistryNotFound(RegistryError):
    """404: no such repository, tag or manifest."""

    code = "registry_not_found"


class RegistryUnavailable(RegistryError):
    """The registry cannot be reached, timed out, or answered with a server error."""

    code = "registry_unavailable"


@dataclass(frozen=True)
class RegistryAuth:
    """An account at a registry. The password never appears in ``repr``."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class RegistryConfig:
    """How registries are reached: hosts spoken to over plain HTTP, the CA bundle, the timeout."""

    insecure: frozenset = frozenset()
    ca_file: str | None = None
    timeout: float = 10.0

    def base_url(self, host: str) -> str:
        return "%s://%s" % ("http" if host in self.insecure else "https", host)

    def ssl_context(self) -> ssl.SSLContext:
        """One context per CA bundle and process (loading the system bundle takes ~70 ms)."""
        ca = self.ca_file if self.ca_file and os.path.isfile(self.ca_file) else None
        key = (ca, os.stat(ca).st_mtime_ns if ca else 0)
        with _CONTEXTS_LOCK:
            ctx = _CONTEXTS.get(key)
            if ctx is None:
                ctx = _CONTEXTS[key] = ssl.create_default_context(cafile=ca)
        return ctx


_CONTEXTS: dict = {}
_CONTEXTS_LOCK = threading.Lock()


def check_host(host: str) -> str:
    """``HOST[:PORT]`` as written in image names, or ValueError."""
    if not isinstance(host, str) or not _HOST.fullmatch(host) or len(host) > 255:
        raise ValueError("not a registry host: %r (write HOST or HOST:PORT, e.g. localhost:5000)" % (host,))
    return host


def check_repository(repo: str) -> str:
    if not isinstance(repo, str) or not _REPO.fullmatch(repo) or len(repo) > 255:
        raise ValueError("not a repository name: %r (lowercase letters and digits separated by . _ - /)" % (repo,))
    return repo


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):   # noqa: D102 (urllib's hook)
        return None


class RegistryClient:
    """One registry host, one account (or anonymous). Not thread-safe (keeps a bearer token)."""

    def __init__(self, host: str, auth: RegistryAuth | None = None, config: RegistryConfig | None = None):
        self.host = check_host(host)
        self.auth = auth
        self.config = config or RegistryConfig()
        self._token: str | None = None
        self._basic = False
        handlers = [_NoRedirect()]
        if host not in self.config.insecure:
            handlers.append(urllib.request.HTTPSHandler(context=self.config.ssl_context()))
        self._opener = urllib.request.build_opener(*handlers)

    # -- what the portal asks ----------------------------------------------------------

    def check_login(self) -> None:
        """Raise unless the account is accepted (``GET /v2/``; with the token flow, a token is issued)."""
        self._request("GET", "/v2/", scope="")

    def resolve(self, repo: str, reference: str) -> str:
        """The manifest digest (``sha256:HEX``) that ``repo:reference`` names now."""
        check_repository(repo)
        if not _TAG_OR_DIGEST.fullmatch(reference or ""):
            raise ValueError("not a tag or digest: %r" % (reference,))
        path = "/v2/%s/manifests/%s" % (repo, reference)
        status, headers, _ = self._request("HEAD", path, scope="repository:%s:pull" % repo,
                                           accept=", ".join(MANIFEST_TYPES), what="%s:%s" % (repo, reference))
        digest = headers.get("Docker-Content-Digest", "")
        if not _DIGEST.fullmatch(digest):
            # some registries leave the header out of HEAD answers: hash the manifest itself
            _, _, body = self._request("GET", path, scope="repository:%s:pull" % repo,
                                       accept=", ".join(MANIFEST_TYPES), what="%s:%s" % (repo, reference),
                                       limit=4 << 20)
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(self.host, "asked for %s@%s, got a manifest with digest %s" % (repo, reference, digest))
        return digest

    def manifest_readable(self, repo: str, digest: str) -> bool:
        """True when this account can read ``repo@digest`` now; False on 401/403/404."""
        try:
            self.resolve(repo, digest)
        except (RegistryAuthError, RegistryNotFound):
            return False
        return True

    def catalog(self, limit: int = 200) -> list[str]:
        """Repositories this account may list (``/v2/_catalog``), at most ``limit``."""
        _, _, body = self._request("GET", "/v2/_catalog?n=%d" % max(1, min(limit, _MAX_LIST)),
                                   scope="registry:catalog:*", what="the catalog", limit=8 << 20)
        names = _json(body, self.host).get("repositories") or []
        return [n for n in names if isinstance(n, str)][:limit]

    def tags(self, repo: str, limit: int = 200) -> list[str]:
        """The tags of ``repo``, at most ``limit``."""
        check_repository(repo)
        _, _, body = self._request("GET", "/v2/%s/tags/list?n=%d" % (repo, max(1, min(limit, _MAX_LIST))),
                                   scope="repository:%s:pull" % repo, what=repo, limit=8 << 20)
        names = _json(body, self.host).get("tags") or []
        return [n for n in names if isinstance(n, str)][:limit]

    # -- HTTP ----------------------------------------------------------------------------

    def _request(self, method: str, path: str, scope: str, accept: str | None = None, what: str = "",
                 limit: int = 1 << 20) -> tuple[int, dict, bytes]:
        for attempt in (1, 2):
            headers = {"User-Agent": "aiportal"}
            if accept:
                headers["Accept"] = accept
            if self._token:
                headers["Authorization"] = "Bearer " + self._token
            elif self.auth and self._basic:
                headers["Authorization"] = _basic(self.auth)
            req = urllib.request.Request(self.config.base_url(self.host) + path, method=method, headers=headers)
            try:
                with self._opener.open(req, timeout=self.config.timeout) as resp:
                    body = resp.read(limit + 1) if method != "HEAD" else b""
                    if len(body) > limit:
                        raise RegistryError(self.host, "answer to %s is larger than %d bytes" % (path, limit))
                    return resp.status, dict(resp.headers.items()), body
            except urllib.error.HTTPError as e:
                challenge = e.headers.get("WWW-Authenticate", "") if e.headers else ""
                e.close()
                if e.code == 401 and attempt == 1 and challenge.lower().startswith("bearer "):
                    self._token = self._fetch_token(challenge, scope)
                    continue
                if e.code == 401 and attempt == 1 and challenge.lower().startswith("basic") \
                        and self.auth and not self._basic:
                    self._basic = True       # the account goes only where a Basic challenge asked
                    continue
                raise self._error(e.code, what or path) from None
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise RegistryUnavailable(self.host, "cannot be reached at %s (%s); check the name and port, "
                                          "and that the registry is up" % (self.config.base_url(self.host), reason)) from None
        raise RegistryAuthError(self.host, "the token the registry issued was refused")

    def _error(self, code: int, what: str) -> RegistryError:
        if code == 401:
            if self.auth is None:
                return RegistryAuthError(self.host, "needs an account: add yours with `aiportal registry login %s`" % self.host)
            return RegistryAuthError(self.host, "refused the account %r (wrong user name or password)" % self.auth.username)
        if code == 403:
            return RegistryAuthError(self.host, "account %r may not read %s" % (self.auth.username if self.auth else "anonymous", what))
        if code == 404:
            return RegistryNotFound(self.host, "%s does not exist (or this account cannot see it)" % what)
        if code == 429 or code >= 500:
            return RegistryUnavailable(self.host, "answered %d for %s; try again later" % (code, what))
        if 300 <= code < 400:
            return RegistryError(self.host, "redirected the request for %s; not followed" % what)
        return RegistryError(self.host, "answered %d for %s" % (code, what))

    def _fetch_token(self, challenge: str, scope: str) -> str:
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = params.pop("realm", "")
        parsed = urllib.parse.urlparse(realm)
        if parsed.scheme not in ("https", "http") or (parsed.scheme == "http" and self.host not in self.config.insecure):
            raise RegistryError(self.host, "token service %r is not an https URL" % realm)
        query = {k: v for k, v in params.items() if k == "service"}
        if scope or params.get("scope"):
            query["scope"] = scope or params["scope"]
        headers = {"User-Agent": "aiportal"}
        if self.auth:
            headers["Authorization"] = _basic(self.auth)
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        try:
            with self._opener.open(urllib.request.Request(url, headers=headers), timeout=self.config.timeout) as resp:
                doc = _json(resp.read(1 << 20), self.host)
        except urllib.error.HTTPError as e:
            e.close()
            raise self._error(e.code, "a token") from None
        except (urllib.error.URLError, OSError) as e:
            raise RegistryUnavailable(self.host, "its token service %s cannot be reached (%s)"
                                      % (parsed.netloc, getattr(e, "reason", e))) from None
        token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or not token:
            raise RegistryError(self.host, "its token service answered without a token")
        return token


def _basic(auth: RegistryAuth) -> str:
    return "Basic " + base64.b64encode(("%s:%s" % (auth.username, auth.password)).encode()).decode()


def _json(body: bytes, host: str) -> dict:
    try:
        doc = json.loads(body)
    except ValueError:
        raise RegistryError(host, "answered with something that is not JSON") from None
    return doc if isinstance(doc, dict) else {}


# -- the credentials file that skopeo, buildah and apptainer read (--authfile) -------------------

def authfile_document(auths: dict[str, RegistryAuth]) -> dict:
    """``{"auths": {HOST: {"auth": base64(USER:PASSWORD)}}}`` (containers-auth.json(5))."""
    return {"auths": {check_host(h): {"auth": base64.b64encode(("%s:%s" % (a.username, a.password)).encode()).decode()}
                      for h, a in auths.items()}}


def write_authfile(path: Path | str, auths: dict[str, RegistryAuth], uid: int | None = None,
                   gid: int | None = None) -> Path:
    """Write a new authfile at ``path``: created 0600 (never an existing file, never through a
    link), owned by ``uid``/``gid`` when given. The caller removes it after use."""
    data = json.dumps(authfile_document(auths)).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        if uid is not None:
            os.fchown(fd, uid, -1 if gid is None else gid)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return Path(path)


def read_authfile(path: Path | str) -> dict[str, RegistryAuth]:
    """The accounts in an authfile (entries that cannot be read are skipped)."""
    doc = json.loads(Path(path).read_text())
    out = {}
    for host, entry in (doc.get("auths") or {}).items():
        try:
            user, _, password = base64.b64decode(entry.get("auth", "")).decode().partition(":")
        except (ValueError, AttributeError):
            continue
        if user:
            out[host] = RegistryAuth(user, password)
    return out
