"""The store interface and its registry: schemes to stores, the refusal of an unknown scheme, a
third store registered here reached by validation, browsing and staging, and the portal-facing
functions (check_locations, browse, parent, default_root, hints) on the two built-in stores.
No request leaves this machine: S3 checks here stop before the store (check_store=False, or a
refusal that needs no request)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

import storage
from storage import store as registry
from storage.credentials import DataSource
from storage.errors import AccessDeniedError, LocationError, UnknownSchemeError
from storage.local import CopyStats
from storage.stage import stage_in, stage_out
from storage.store import (Checked, Entry, Listing, LocationHint, StageRequest, Store, StoreContext, scheme_of,
                           store_for)
from storage.stores.s3 import S3DataStore, transfer_options
from storage.stores.shared import SharedStore
from storage.transfer import TransferOptions
from storage.validate import check_location, validate_location


def src(name="lab", buckets=(), **kw):
    return DataSource(name=name, endpoint="http://127.0.0.1:9000", region="us-east-1",
                      access_key="AKIAEXAMPLEKEY000001", secret_key="not-a-real-secret-0123456789",
                      buckets=buckets, **kw)


# -- the registry ----------------------------------------------------------------------------------

@pytest.mark.parametrize("uri, scheme", [
    ("/srv/shared/x", "file"), ("file:///srv/x", "file"), ("relative/x", "file"), ("", "file"),
    ("s3://bkt/p", "s3"), ("gs://b/x", "gs"), ("S3://bkt/p", "S3"),
])
def test_scheme_of(uri, scheme):
    assert scheme_of(uri) == scheme


@pytest.mark.parametrize("uri, kind", [
    ("/srv/shared/x", SharedStore), ("file:///srv/x", SharedStore), ("s3://bkt/p", S3DataStore),
])
def test_built_in_stores_by_scheme(uri, kind):
    assert type(store_for(uri)) is kind
    assert store_for(uri) is store_for(uri)            # one instance per scheme


@pytest.mark.parametrize("uri, scheme", [("gs://abc/x", "gs"), ("S3://abc/x", "S3"), ("https://h/x", "https")])
def test_unknown_scheme_names_the_uri_and_the_known_schemes(uri, scheme):
    with pytest.raises(UnknownSchemeError) as e:
        store_for(uri)
    err = e.value
    assert isinstance(err, LocationError) and err.code == "bad_location"
    assert (err.uri, err.scheme, err.known) == (uri, scheme, ("file", "s3"))
    assert str(err) == ("%s: unknown scheme %r; use an absolute path on the shared filesystem or "
                        "s3://bucket/prefix (schemes known here: file, s3)" % (uri, scheme))


@pytest.mark.parametrize("scheme", ["", "3x", "Mem", "a b", "s3"])
def test_register_refuses_bad_or_taken_schemes(scheme):
    class Bad(MemStore):
        pass
    Bad.scheme = scheme
    with pytest.raises(ValueError, match="already handled" if scheme == "s3" else "must be lowercase"):
        registry.register(Bad({}))
    assert type(store_for("s3://bkt/x")) is S3DataStore


# -- a third store, registered by a test ------------------------------------------------------------

@dataclass(frozen=True)
class MemLocation:
    box: str
    key: str
    original: str

    @property
    def uri(self) -> str:
        return "mem://%s/%s" % (self.box, self.key) if self.key else "mem://%s" % self.box


class MemStore(Store[MemLocation]):
    """Files in a dict: {"box/key": bytes}. Needs the data source named "mem-NAME" for box NAME."""

    scheme = "mem"
    form = "mem://box/key"
    takes_credentials = True

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.calls: list[str] = []

    def parse(self, text):
        box, _, key = text[len("mem://"):].partition("/")
        if not box:
            raise LocationError(text, "name the box: mem://box/key")
        return MemLocation(box, key.strip("/"), text)

    def check(self, loc, ctx):
        name = "mem-%s" % loc.box
        if name not in ctx.sources:
            raise LocationError(loc.original, "no data source %r" % name)
        return Checked(loc, (ctx.sources[name],))

    def validate(self, checked, ctx, must_exist, check_store):
        self.calls.append("validate %s" % checked.location.uri)
        loc = checked.location
        if must_exist and not self._under(loc):
            raise LocationError(loc.original, "nothing in the box here")

    def _under(self, loc):
        base = "%s/%s" % (loc.box, loc.key) if loc.key else loc.box
        return {k[len(base) + 1:]: v for k, v in self.files.items() if k.startswith(base + "/")}

    def stage_in(self, loc, dest_dir, missing_ok, req):
        stats = CopyStats()
        for rel, data in self._under(loc).items():
            (dest_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest_dir / rel).write_bytes(data)
            stats.files += 1
            stats.copied += 1
        return stats

    def stage_out(self, src, loc, req):
        stats = CopyStats()
        for p in sorted(Path(src).rglob("*")):
            if p.is_file():
                self.files["%s/%s/%s" % (loc.box, loc.key, p.relative_to(src).as_posix())] = p.read_bytes()
                stats.files += 1
        return stats

    def browse(self, loc, ctx, source, page_size, token):
        self.check(loc, ctx)
        names = sorted({rel.split("/")[0] + ("/" if "/" in rel else "") for rel in self._under(loc)})
        return Listing([Entry(n.rstrip("/"), "%s/%s" % (loc.uri, n.rstrip("/")), n.endswith("/"))
                        for n in names], None)

    def parent(self, loc):
        if not loc.key:
            return None
        head = loc.key.rpartition("/")[0]
        return "mem://%s/%s" % (loc.box, head) if head else "mem://%s" % loc.box

    def roots(self, source):
        return ("mem://%s" % source.name[4:],) if source.name.startswith("mem-") else ()

    def hints(self, source):
        return tuple(LocationHint(r + "/", "box %s" % r[6:]) for r in self.roots(source))


@pytest.fixture
def mem():
    store = registry.register(MemStore({"box1/data/a.txt": b"A", "box1/data/sub/b.txt": b"BB"}))
    try:
        yield store
    finally:
        registry.unregister("mem")
    assert "mem" not in registry.schemes()


def test_a_registered_store_is_used_by_validation(mem, tmp_path):
    ctx = StoreContext(sources={"mem-box1": src("mem-box1")})
    assert validate_location("mem://box1/data", sources=ctx.sources, must_exist=True).key == "data"
    with pytest.raises(LocationError, match="nothing in the box here"):
        validate_location("mem://box1/none", sources=ctx.sources, must_exist=True)
    with pytest.raises(LocationError, match="no data source 'mem-box2'"):
        validate_location("mem://box2/x", sources=ctx.sources)
    assert check_location("mem://box1/x", (), ctx.sources)[1].name == "mem-box1"
    needed = storage.check_locations(["mem://box1/data", str(tmp_path)], "mem://box1/out",
                                     StoreContext((str(tmp_path),), ctx.sources), check_store=False)
    assert needed == {"mem-box1": ctx.sources["mem-box1"]}
    assert mem.calls == ["validate mem://box1/data", "validate mem://box1/none", "validate mem://box1/data",
                         "validate mem://box1/out"]
    assert storage.needs_credentials("mem://box1/x") and not storage.needs_credentials("/srv/x")


def test_a_registered_store_is_used_by_browsing(mem):
    ctx = StoreContext(sources={"mem-box1": src("mem-box1")})
    listing = storage.browse_uri("mem://box1/data", ctx)
    assert [(e.name, e.uri, e.is_dir) for e in listing.entries] == [
        ("a.txt", "mem://box1/data/a.txt", False), ("sub", "mem://box1/data/sub", True)]
    assert storage.parent("mem://box1/data/sub") == "mem://box1/data"
    assert storage.parent("mem://box1") is None
    assert storage.default_root(src("mem-box1")) == "mem://box1"
    assert storage.location_hints(src("mem-box1")) == (LocationHint("mem://box1/", "box box1"),
                                                       LocationHint("s3://", "any bucket (data source mem-box1)"))
    with pytest.raises(UnknownSchemeError, match=r"schemes known here: file, mem, s3"):
        storage.browse_uri("gs://b/x", ctx)


def test_a_registered_store_is_used_by_staging(mem, tmp_path):
    stats = stage_in("mem://box1/data", str(tmp_path / "in"))
    assert stats.copied == 2 and (tmp_path / "in" / "sub" / "b.txt").read_bytes() == b"BB"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.bin").write_bytes(b"M")
    stage_out(str(tmp_path / "out"), "mem://box1/runs/1")
    assert mem.files["box1/runs/1/model.bin"] == b"M"
    assert not list(tmp_path.glob("STAGE_OUT_PENDING.*"))       # the record goes once it is done


def test_a_removed_store_is_unknown_again():
    registry.register(MemStore({}))
    registry.unregister("mem")
    with pytest.raises(UnknownSchemeError, match=r"schemes known here: file, s3\)$"):
        validate_location("mem://box1/x")


def test_a_built_in_store_can_be_replaced_and_restored():
    class Other(MemStore):
        scheme = "s3"
    registry.register(Other({}), replace=True)
    try:
        assert type(store_for("s3://bkt/x")) is Other
    finally:
        registry.restore_builtin("s3")
    assert type(store_for("s3://bkt/x")) is S3DataStore


# -- the built-in stores through the portal-facing functions ------------------------------------

@pytest.mark.parametrize("uri, parent", [
    ("s3://bkt/x/y", "s3://bkt/x"), ("s3://bkt/x/y/", "s3://bkt/x"), ("s3://bkt/x", "s3://bkt"),
    ("s3://bkt", None), ("s3://bkt/", None),
    ("/srv/shared/a", "/srv/shared"), ("/srv/", "/"), ("/", None), ("file:///srv/a/b", "/srv/a"),
])
def test_parent(uri, parent):
    assert storage.parent(uri) == parent


def test_roots_and_hints_of_a_data_source():
    two, anyb = src("lab", ("alpha", "beta")), src("any")
    assert storage.default_root(two) == "s3://alpha" and storage.source_roots(two) == ("s3://alpha", "s3://beta")
    assert storage.default_root(anyb) is None
    assert storage.location_hints(two) == (LocationHint("s3://alpha/", "bucket alpha (data source lab)"),
                                           LocationHint("s3://beta/", "bucket beta (data source lab)"))
    assert storage.location_hints(anyb) == (LocationHint("s3://", "any bucket (data source any)"),)

    @dataclass(frozen=True)
    class PublicView:                   # what the portal shows of a source: no keys
        name: str
        buckets: list[str]
    assert storage.location_hints(PublicView("lab", ["alpha", "beta"])) == storage.location_hints(two)
    assert storage.default_root(PublicView("lab", ["beta"])) == "s3://beta"


def test_check_locations_returns_the_sources_a_job_needs(tmp_path):
    root = tmp_path / "users" / "alice"
    (root / "in").mkdir(parents=True)
    a, b = src("a", ("alpha",)), src("b", ("beta",))
    ctx = StoreContext((str(root),), {"a": a, "b": b})
    assert storage.check_locations([str(root / "in")], str(root / "out"), ctx) == {}
    assert storage.check_locations(["s3://alpha/x", str(root / "in")], "s3://beta/out", ctx,
                                   check_store=False) == {"a": a, "b": b}
    with pytest.raises(LocationError, match="does not exist"):
        storage.check_locations([str(root / "missing")], None, ctx)
    with pytest.raises(LocationError, match="outside the data roots"):
        storage.check_locations([], str(tmp_path / "users" / "bob" / "out"), ctx)
    with pytest.raises(LocationError, match="no data source serves bucket 'gamma'"):
        storage.check_locations(["s3://gamma/x"], None, ctx, check_store=False)
    with pytest.raises(UnknownSchemeError):
        storage.check_locations([], "ftp://h/x", ctx)


def test_browse_a_shared_folder(tmp_path):
    root = tmp_path / "root"
    (root / "b-dir").mkdir(parents=True)
    (root / "a-dir").mkdir()
    (root / "z.txt").write_bytes(b"12345")
    (root / "c.bin").write_bytes(b"1")
    (root / ".x.h.1.ab.aiportal-partial").write_bytes(b"tmp")        # a download in flight: not shown
    (root / "link").symlink_to(tmp_path)                                 # symlinks are not staged: not shown
    ctx = StoreContext((str(root),))
    first = storage.browse_uri(str(root), ctx, page_size=3)
    assert [(e.name, e.is_dir, e.size) for e in first.entries] == [("a-dir", True, 0), ("b-dir", True, 0),
                                                                   ("c.bin", False, 1)]
    assert first.entries[0].uri == str(root / "a-dir") and first.entries[2].last_modified is not None
    rest = storage.browse_uri("file://" + str(root), ctx, page_size=3, token=first.next_token)
    assert [e.name for e in rest.entries] == ["z.txt"] and rest.next_token is None
    with pytest.raises(LocationError, match="outside the data roots"):
        storage.browse_uri(str(tmp_path), ctx)
    with pytest.raises(LocationError, match="is a file"):
        storage.browse_uri(str(root / "z.txt"), ctx)
    with pytest.raises(LocationError, match="does not exist"):
        storage.browse_uri(str(root / "nope"), ctx)
    with pytest.raises(LocationError, match="not browsed through a data source"):
        storage.browse_uri(str(root), ctx, source="lab")
    with pytest.raises(LocationError, match="page token 'x'"):
        storage.browse_uri(str(root), ctx, token="x")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_browse_an_unreadable_shared_folder(tmp_path):
    (tmp_path / "closed").mkdir(mode=0o000)
    try:
        with pytest.raises(AccessDeniedError, match="cannot list this folder"):
            storage.browse_uri(str(tmp_path / "closed"), StoreContext((str(tmp_path),)))
    finally:
        (tmp_path / "closed").chmod(0o700)


def test_browse_s3_with_a_source_that_is_not_the_users():
    ctx = StoreContext(sources={"lab": src("lab", ("alpha",))})
    with pytest.raises(LocationError, match=r"no data source named 'other' \(yours: lab\)"):
        storage.browse_uri("s3://alpha/x", ctx, source="other")
    with pytest.raises(LocationError, match="no data source credentials"):
        storage.browse_uri("s3://alpha/x", StoreContext())


@pytest.mark.parametrize("opt_cap, source_cap, arg_cap, want", [
    (None, None, None, None), (None, 800, None, 800), (None, 800, 100, 100), (50, 800, 100, 50),
    (None, None, 100, 100),
])
def test_transfer_options_take_the_lowest_bandwidth_cap(opt_cap, source_cap, arg_cap, want):
    req = StageRequest(options=TransferOptions(bandwidth_mbps=opt_cap), bandwidth_mbps=arg_cap)
    assert transfer_options(src(bandwidth_mbps=source_cap), req).bandwidth_mbps == want


@pytest.mark.parametrize("opt_workers, source_workers, arg_workers, want", [
    (8, None, None, 8), (8, 4, None, 4), (8, 4, 2, 2), (16, None, 3, 3),
])
def test_transfer_options_workers(opt_workers, source_workers, arg_workers, want):
    req = StageRequest(options=TransferOptions(workers=opt_workers), workers=arg_workers, progress_every=0.5)
    opt = transfer_options(src(workers=source_workers), req)
    assert (opt.workers, opt.progress_every) == (want, 0.5)
