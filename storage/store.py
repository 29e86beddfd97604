"""Data stores, keyed by URI scheme, and what the portal calls on a data location.

A :class:`Store` is everything one kind of location needs: parsing and checking it for a user
(roots, which data source and so which credentials), checking it against the world (exists,
the keys open it), staging in and out, and browsing one level. The registry maps a URI's
scheme to its store (:func:`store_for`); a location without ``://`` is a shared-filesystem
path (scheme ``file``). Built-in: ``file`` (:mod:`storage.stores.shared`) and ``s3``
(:mod:`storage.stores.s3`), imported on first use so that boto3 is loaded only where an
``s3://`` location is met. A new kind of store is one module with a :class:`Store` subclass,
plus one line in ``_BUILTIN`` (or a :func:`register` call).

The functions at the bottom (:func:`check_locations`, :func:`browse_uri`, :func:`parent`,
:func:`default_root`, ...) take a URI and the user's :class:`StoreContext`; callers never need
to know the scheme.
"""
from __future__ import annotations

import abc
import importlib
import os
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Generic, Mapping, Protocol, Sequence, TypeVar

from storage.credentials import DataSource
from storage.errors import UnknownSchemeError

if TYPE_CHECKING:
    from storage.local import CopyStats
    from storage.transfer import TransferOptions

SHARED_SCHEME = "file"
_SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]*$")

#: A credentials file (its path), sources already loaded, or None (no data source needed).
Credentials = str | os.PathLike | Mapping[str, DataSource] | None


class Location(Protocol):
    """What every store's parsed location offers: the canonical URI and the text it came from."""

    @property
    def uri(self) -> str: ...

    @property
    def original(self) -> str: ...


L = TypeVar("L", bound=Location)


class NamedSource(Protocol):
    """What roots and hints need of a data source: its name and the buckets it lists. A
    :class:`DataSource` is one; so is the portal's public view of one (no keys needed)."""

    @property
    def name(self) -> str: ...

    @property
    def buckets(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class StoreContext:
    """Who is asking. ``roots``: the shared-filesystem directories this account may use (empty:
    any path); ``sources``: its data sources by name; ``timeout_s``: for checks against a store
    (the portal is answering a user: one or two requests, no retries)."""

    roots: tuple[str, ...] = ()
    sources: Mapping[str, DataSource] = field(default_factory=dict)
    timeout_s: float = 10.0

    def __post_init__(self):
        object.__setattr__(self, "roots", tuple(self.roots))


@dataclass(frozen=True)
class Checked(Generic[L]):
    """A location that passed the checks for one user, and the data sources (credentials) a job
    needs to stage it."""

    location: L
    sources: tuple[DataSource, ...] = ()


@dataclass(frozen=True)
class Entry:
    """One row of a listing: a "directory" (``is_dir``, size 0) or a file/object."""

    name: str
    uri: str
    is_dir: bool
    size: int = 0
    last_modified: datetime | None = None


@dataclass(frozen=True)
class Listing:
    entries: list[Entry]
    next_token: str | None        #: pass back to get the next page


@dataclass(frozen=True)
class LocationHint:
    """A place to start typing a location for a data source: ``prefix`` (e.g. ``s3://bucket/``)
    and a label for people."""

    prefix: str
    label: str


@dataclass(frozen=True)
class StageRequest:
    """How to move data (``aiportal stage``): credentials and transfer settings. Explicit
    arguments override ``options`` and the data source's settings; a bandwidth cap can only be
    lowered."""

    credentials: Credentials = None
    options: TransferOptions | None = None
    workers: int | None = None
    bandwidth_mbps: float | None = None
    progress_every: float | None = None
    emit: Callable[[str], object] | None = None


class Store(abc.ABC, Generic[L]):
    """One kind of data location. Methods raise :class:`storage.errors.StorageError`
    subclasses whose messages name the location and the fix."""

    scheme: ClassVar[str]              #: the URI scheme this store is registered under
    form: ClassVar[str]                #: how its locations are written, for messages
    takes_credentials: ClassVar[bool] = False    #: staging it needs data-source keys
    #: a job can bind its locations into the container instead of copying them (a path every
    #: node sees: the shared filesystem)
    bindable: ClassVar[bool] = False

    @abc.abstractmethod
    def parse(self, text: str) -> L:
        """Pure: the location, or :class:`LocationError` (syntax)."""

    @abc.abstractmethod
    def check(self, loc: L, ctx: StoreContext) -> Checked[L]:
        """Pure: the location may be used by this user (roots, data source); the data sources
        staging it needs."""

    @abc.abstractmethod
    def validate(self, checked: Checked[L], ctx: StoreContext, must_exist: bool, check_store: bool) -> None:
        """What needs the world: it exists (``must_exist``), is readable or writable, the keys
        open it. ``check_store=False``: skip requests to a remote store."""

    @abc.abstractmethod
    def stage_in(self, loc: L, dest_dir: Path, missing_ok: bool, req: StageRequest) -> CopyStats:
        """Copy the location (a directory or one file) into ``dest_dir``; identical files are
        skipped; ``missing_ok``: a location that does not exist yet is not an error."""

    @abc.abstractmethod
    def stage_out(self, src: Path, loc: L, req: StageRequest) -> CopyStats:
        """Copy ``src`` (a directory or one file) to the location; identical files are skipped."""

    @abc.abstractmethod
    def browse(self, loc: L, ctx: StoreContext, source: str | None, page_size: int,
               token: str | None) -> Listing:
        """One level below the location, checked for this user as :meth:`check` does first:
        directories first, then files, by name; paged. ``source``: browse with this data
        source of ``ctx`` (else the one that serves it)."""

    @abc.abstractmethod
    def parent(self, loc: L) -> str | None:
        """The URI one level up, or None at the top."""

    def roots(self, source: NamedSource) -> tuple[str, ...]:
        """The locations a data source names (e.g. its buckets); () when it names none."""
        return ()

    def hints(self, source: NamedSource) -> tuple[LocationHint, ...]:
        """Where a user of ``source`` would start typing a location."""
        return ()


# -- the registry ---------------------------------------------------------------------------

#: Built-in stores, imported on first use: scheme -> "module:Class".
_BUILTIN: dict[str, str] = {
    SHARED_SCHEME: "storage.stores.shared:SharedStore",
    "s3": "storage.stores.s3:S3DataStore",
}
_registry: dict[str, Store | str] = dict(_BUILTIN)
_lock = threading.RLock()         # a store module may register() while it is imported


def scheme_of(uri: str) -> str:
    """Pure: the scheme of a URI (``s3://b/k`` -> ``s3``); a path without ``://`` is ``file``."""
    return uri.partition("://")[0] if "://" in uri else SHARED_SCHEME


def _load(scheme: str) -> Store | None:
    with _lock:
        entry = _registry.get(scheme)
        if isinstance(entry, str):
            module, _, name = entry.partition(":")
            entry = getattr(importlib.import_module(module), name)()
            _registry[scheme] = entry
        return entry


def register(store: Store, replace: bool = False) -> Store:
    """Make ``store`` handle ``store.scheme://`` locations. A scheme already taken is refused
    unless ``replace``. Returns the store."""
    scheme = getattr(store, "scheme", "")
    if not _SCHEME_RE.match(scheme or ""):
        raise ValueError("store %r: scheme %r must be lowercase letters, digits, '+', '-' or '.', "
                         "starting with a letter" % (store, scheme))
    with _lock:
        if scheme in _registry and not replace:
            raise ValueError("scheme %r is already handled by %r; pass replace=True to swap it"
                             % (scheme, _registry[scheme]))
        _registry[scheme] = store
    return store


def unregister(scheme: str) -> None:
    """Forget the store of ``scheme`` (a built-in one comes back with :func:`restore_builtin`)."""
    with _lock:
        _registry.pop(scheme, None)


def restore_builtin(scheme: str) -> None:
    """Put a built-in store back (after a test replaced or removed it)."""
    with _lock:
        _registry[scheme] = _BUILTIN[scheme]


def schemes() -> tuple[str, ...]:
    """The registered schemes, sorted."""
    with _lock:
        return tuple(sorted(_registry))


def stores() -> tuple[Store, ...]:
    """Every registered store (built-in ones are imported), by scheme."""
    return tuple(s for s in (_load(k) for k in schemes()) if s is not None)


def store_for(uri: str) -> Store:
    """The store for a location; :class:`UnknownSchemeError` names the URI and the schemes known."""
    store = _load(scheme_of(uri))
    if store is None:
        known = stores()
        raise UnknownSchemeError(uri, scheme_of(uri), tuple(s.scheme for s in known), tuple(s.form for s in known))
    return store


# -- what the portal calls --------------------------------------------------------------------

def parse_uri(uri: str) -> Location:
    """Pure: the parsed location (syntax only)."""
    return store_for(uri).parse(uri)


def check_uri(uri: str, ctx: StoreContext) -> Checked:
    """Pure: syntax, the user's roots, which data source serves it."""
    store = store_for(uri)
    return store.check(store.parse(uri), ctx)


def validate_uri(uri: str, ctx: StoreContext, must_exist: bool = False, check_store: bool = True) -> Checked:
    """:func:`check_uri`, then against the world (symlinks, existence, the keys)."""
    store = store_for(uri)
    checked = store.check(store.parse(uri), ctx)
    store.validate(checked, ctx, must_exist, check_store)
    return checked


def check_locations(inputs: Sequence[str], output: str | None, ctx: StoreContext,
                    check_store: bool = True) -> dict[str, DataSource]:
    """A job's locations (inputs must exist; the output need not): the data sources the job
    needs to stage them, by name."""
    needed: dict[str, DataSource] = {}
    for uri, must_exist in [(u, True) for u in inputs] + ([(output, False)] if output else []):
        for src in validate_uri(uri, ctx, must_exist=must_exist, check_store=check_store).sources:
            needed[src.name] = src
    return needed


def bind_source(uri: str) -> str | None:
    """Pure: the host path a job may bind for input ``uri`` instead of copying it (its store is
    :attr:`Store.bindable`), else None."""
    store = store_for(uri)
    return store.parse(uri).path if store.bindable else None


def needs_credentials(uri: str) -> bool:
    """Whether staging ``uri`` needs data-source keys (a credentials file)."""
    return store_for(uri).takes_credentials


def browse_uri(uri: str, ctx: StoreContext, source: str | None = None, page_size: int = 1000,
           token: str | None = None) -> Listing:
    """One level below ``uri`` (the store checks it for this user first); ``source``: browse
    with that data source of ``ctx`` rather than the one that serves the location."""
    store = store_for(uri)
    return store.browse(store.parse(uri), ctx, source, page_size, token)


def parent(uri: str) -> str | None:
    """Pure: the URI one level up, or None at the top (a bucket, ``/``)."""
    store = store_for(uri)
    return store.parent(store.parse(uri))


def source_roots(source: NamedSource) -> tuple[str, ...]:
    """The locations a data source names (e.g. ``s3://BUCKET`` for each bucket it lists)."""
    return tuple(r for s in stores() for r in s.roots(source))


def default_root(source: NamedSource) -> str | None:
    """Where browsing a data source starts: its first root, or None when it names none."""
    roots = source_roots(source)
    return roots[0] if roots else None


def location_hints(source: NamedSource) -> tuple[LocationHint, ...]:
    """Prefixes to offer when a user of ``source`` types a location."""
    return tuple(h for s in stores() for h in s.hints(source))


def check_access(source: DataSource, timeout_s: float = 10.0) -> None:
    """Each location the source names exists and its keys open it (before it is stored)."""
    ctx = StoreContext(sources={source.name: source}, timeout_s=timeout_s)
    for root in source_roots(source):
        validate_uri(root, ctx)
