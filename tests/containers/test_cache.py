"""SifCache with real files, real flocks and real processes; the builder is a fake below the
adapter boundary (it writes a small file instead of running apptainer). The real conversions
are in test_cache_apptainer.py."""
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import containers.digests as digests_mod
from containers.cache import CacheEntry, SifCache
from containers.digests import file_sha256, manifest_digest, source_files
from containers.errors import CacheError, ImageBuildError, ImageRefError
from containers.refs import parse_image_ref
from tests.conftest import REPO

HEX = "0123456789abcdef" * 4


class FakeBuilder:
    """Writes ``SIF <location>`` (or ``content``) to dest and records each call."""

    def __init__(self, cache: SifCache | None = None, content: bytes | None = None):
        self.cache = cache
        self.content = content
        self.calls = []

    def __call__(self, ref, dest: Path):
        self.calls.append(str(ref))
        if self.cache is not None:
            assert dest.parent == self.cache.images and dest.name.startswith(".")
            assert dest.name.endswith(".%d.partial" % os.getpid())
            assert not (dest.parent / (dest.name.split(".")[1] + ".sif")).exists()
        dest.write_bytes(self.content or b"SIF " + ref.location.encode())


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def cache(tmp_path):
    c = SifCache(tmp_path / "cache")
    c.builder = FakeBuilder(c)
    return c


@pytest.fixture
def archive(tmp_path):
    path = tmp_path / "img.tar"
    path.write_bytes(b"archive bytes " * 100_000)
    return path


def ref_of(path, scheme="docker-archive"):
    return parse_image_ref("%s:%s" % (scheme, path) if scheme else str(path))


@pytest.mark.parametrize("digest, ok", [
    ("sha256:" + HEX, True),
    ("sha256:" + HEX.upper(), False),
    ("sha256:" + HEX[:-1], False),
    (HEX, False),
    ("sha256:../../etc/passwd", False),
    ("md5:" + HEX[:32], False),
    (None, False),
])
def test_path_for(tmp_path, digest, ok):
    c = SifCache(tmp_path)
    if ok:
        assert c.path_for(digest) == tmp_path / "sha256" / (HEX + ".sif")
        assert c.lock_path(digest) == tmp_path / "sha256" / (HEX + ".lock")
    else:
        with pytest.raises(ValueError, match="is not sha256: and 64 lowercase hex digits"):
            c.path_for(digest)


def test_file_sha256_streams_whole_file(tmp_path):
    path = tmp_path / "big"
    data = os.urandom(3 * (1 << 20) + 17)
    path.write_bytes(data)
    assert file_sha256(path) == sha(data)


@pytest.mark.parametrize("scheme, name", [
    ("docker-archive", "a.tar"), ("oci-archive", "a.tar"), (None, "a.sif"), (None, "a.def")])
def test_digest_of_files_is_their_sha256(cache, tmp_path, scheme, name):
    path = tmp_path / name
    data = b"Bootstrap: docker\nFrom: x\n" if name.endswith(".def") else os.urandom(1000)
    path.write_bytes(data)
    assert cache.digest_of(ref_of(path, scheme)) == sha(data)


@pytest.mark.parametrize("text, fragment", [
    ("docker://python:3.11", "resolve the tag first"),
    ("docker-archive:/nonexistent/x.tar", "no such file: /nonexistent/x.tar"),
    ("/nonexistent/x.sif", "no such file: /nonexistent/x.sif"),
    ("oci:/nonexistent", "no OCI layout directory at /nonexistent"),
    ("docker-archive:/tmp", "/tmp is not a regular file"),
    ("oci:/tmp", "/tmp has no index.json: not an OCI image layout"),
])
def test_digest_of_refuses(cache, text, fragment):
    with pytest.raises(ImageRefError) as e:
        cache.digest_of(parse_image_ref(text))
    assert fragment in str(e.value)
    assert e.value.ref == text


def index_json(*tags):
    return json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json",
         "digest": "sha256:" + (str(i) * 64), "size": 1,
         **({"annotations": {"org.opencontainers.image.ref.name": t}} if t else {})}
        for i, t in enumerate(tags, 1)]})


@pytest.mark.parametrize("index, tag, result", [
    (index_json("latest"), "latest", "sha256:" + "1" * 64),
    (index_json("latest"), None, "sha256:" + "1" * 64),
    (index_json(None), None, "sha256:" + "1" * 64),
    (index_json("a", "b"), "b", "sha256:" + "2" * 64),
    (index_json("a", "b"), None, "the layout holds 2 images; name one as oci:DIR:TAG (tags: a, b)"),
    (index_json("a"), "c", "tag 'c' is not in the layout (tags: a)"),
    (index_json(), None, "the layout holds 0 images; name one as oci:DIR:TAG (tags: none)"),
    ('{"manifests": [{"digest": "sha256:xyz"}]}', None, "the manifest digest 'sha256:xyz' is not"),
    ("not json", None, "index.json is not an OCI image index"),
    ("[]", None, "index.json is not an OCI image index"),
])
def test_manifest_digest(index, tag, result):
    if result.startswith("sha256:"):
        assert manifest_digest(index, tag, "oci:/l") == result
    else:
        with pytest.raises(ImageRefError) as e:
            manifest_digest(index, tag, "oci:/l")
        assert result in str(e.value)


def test_oci_layout_digest_is_the_manifest_digest(cache, tmp_path):
    layout = tmp_path / "layout"
    layout.mkdir()
    (layout / "index.json").write_text(index_json("v1", "v2"))
    assert cache.digest_of(parse_image_ref("oci:%s:v2" % layout)) == "sha256:" + "2" * 64
    with pytest.raises(ImageRefError, match="name one as oci:DIR:TAG"):
        cache.digest_of(parse_image_ref("oci:%s" % layout))


def test_definition_digest_folds_in_the_files_it_copies(cache, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "b.txt").write_text("b")
    (tmp_path / "data" / "sub").mkdir()
    (tmp_path / "data" / "sub" / "c.txt").write_text("c")
    (tmp_path / "hello.txt").write_text("hello")
    (tmp_path / "w1.cfg").write_text("1")
    (tmp_path / "base.sif").write_bytes(b"base")
    definition = tmp_path / "img.def"
    definition.write_text("Bootstrap: localimage\nFrom: base.sif\n%files\n    hello.txt /opt/\n"
                          "    data /opt/data\n    *.cfg /etc/\n    {{ X }} /x\n"
                          "%files from other\n    /nowhere /x\n")
    ref = ref_of(definition, None)
    assert source_files(ref) == [definition, tmp_path / "base.sif", tmp_path / "hello.txt",
                                  tmp_path / "data" / "b.txt", tmp_path / "data" / "sub" / "c.txt",
                                  tmp_path / "w1.cfg"]
    first = cache.digest_of(ref)
    assert first != sha(definition.read_bytes())
    assert cache.digest_of(ref) == first
    digests = {first}
    for changed in ("hello.txt", "data/sub/c.txt", "w1.cfg", "base.sif"):
        (tmp_path / changed).write_text("changed " + changed)
        digests.add(cache.digest_of(ref))
    (tmp_path / "w2.cfg").write_text("2")
    digests.add(cache.digest_of(ref))
    assert len(digests) == 6


@pytest.mark.parametrize("files, fragment", [
    ("missing.txt /x", "%files source {d}/missing.txt does not exist"),
    ("*.nothing /x", "%files source *.nothing matches nothing"),
])
def test_definition_with_missing_sources(cache, tmp_path, files, fragment):
    definition = tmp_path / "img.def"
    definition.write_text("Bootstrap: debootstrap\n%%files\n    %s\n" % files)
    with pytest.raises(ImageRefError) as e:
        cache.digest_of(ref_of(definition, None))
    assert fragment.format(d=tmp_path) in str(e.value)


def test_definition_that_does_not_parse(cache, tmp_path):
    definition = tmp_path / "img.def"
    definition.write_text("From: python:3.11\n")
    with pytest.raises(ImageRefError, match="not an Apptainer definition: no 'Bootstrap:'"):
        cache.digest_of(ref_of(definition, None))


def test_index_avoids_rehashing_an_unchanged_file(cache, archive, monkeypatch):
    hashed = []
    real = digests_mod.file_sha256
    monkeypatch.setattr(digests_mod, "file_sha256", lambda p: hashed.append(p) or real(p))
    ref = ref_of(archive)
    digest = cache.digest_of(ref)
    assert cache.digest_of(ref) == digest and cache.digest_of(ref) == digest
    assert hashed == [archive]
    records = list(cache.refs_dir.glob("*.json"))
    assert len(records) == 1
    assert json.loads(records[0].read_text())["digest"] == digest

    st = archive.stat()
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 1))     # touched, same bytes
    assert cache.digest_of(ref) == digest
    assert hashed == [archive, archive]

    data = archive.read_bytes()
    archive.write_bytes(data[:-1] + b"X")                             # same size, new bytes
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 1))        # even with the old mtime
    assert cache.digest_of(ref) == sha(data[:-1] + b"X") != digest
    assert len(hashed) == 3


def test_lookup_ensure_hit(cache, archive):
    ref = ref_of(archive)
    assert cache.lookup(ref) is None
    path = cache.ensure(ref)
    assert path == cache.path_for(sha(archive.read_bytes()))
    assert path.read_bytes() == b"SIF " + str(archive).encode()
    assert cache.builder.calls == [str(ref)]
    used = cache.images / (path.stem + ".used")
    os.utime(used, (1000, 1000))
    assert cache.lookup(ref) == path
    assert used.stat().st_mtime > 1000
    os.utime(used, (1000, 1000))
    other = FakeBuilder()
    assert cache.ensure(ref, builder=other) == path
    assert other.calls == [] and cache.builder.calls == [str(ref)]
    assert used.stat().st_mtime > 1000
    assert sorted(p.name for p in cache.images.iterdir()) == sorted(
        [path.name, path.stem + ".lock", path.stem + ".used"])


def test_ensure_reports_progress(cache, archive):
    heard = []
    cache.ensure(ref_of(archive), progress=heard.append)
    cache.ensure(ref_of(archive), progress=heard.append)
    assert heard[0] == "hashing docker-archive:%s" % archive
    assert heard[1].startswith("converting docker-archive:%s to " % archive)
    assert heard[2].startswith("converted in ")
    assert heard[3].startswith("cached: ")


def test_modes_under_a_restrictive_umask(cache, archive):
    old = os.umask(0o077)
    try:
        path = cache.ensure(ref_of(archive))
    finally:
        os.umask(old)
    for d in (cache.root, cache.apptainer_cachedir, cache.apptainer_tmpdir):
        assert d.stat().st_mode & 0o777 == 0o755, d
    for d in (cache.images, cache.refs_dir):        # read by digest, not listed
        assert d.stat().st_mode & 0o777 == 0o711, d
    assert path.stat().st_mode & 0o777 == 0o644
    for record in cache.refs_dir.iterdir():
        assert record.stat().st_mode & 0o777 == 0o644


def test_failed_build_leaves_no_sif_and_no_partial(cache, archive):
    def failing(ref, dest):
        dest.write_bytes(b"half a sif")
        raise ImageBuildError(["apptainer", "build", str(dest), str(ref)], 255, "",
                              "FATAL:   While performing build: unexpected EOF\n")

    with pytest.raises(ImageBuildError, match="exited 255: FATAL:   While performing build"):
        cache.ensure(ref_of(archive), builder=failing)
    assert [p.name for p in cache.images.iterdir()] == [
        cache.lock_path(cache.digest_of(ref_of(archive))).name]
    assert cache.lookup(ref_of(archive)) is None
    assert cache.ensure(ref_of(archive)).is_file()


def test_interrupted_build_leaves_no_partial(cache, archive):
    def interrupted(ref, dest):
        dest.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.ensure(ref_of(archive), builder=interrupted)
    assert not list(cache.images.glob("*partial*")) and not list(cache.images.glob("*.sif"))


def test_builder_that_writes_nothing(cache, archive):
    with pytest.raises(CacheError, match="the builder wrote no image for docker-archive:"):
        cache.ensure(ref_of(archive), builder=lambda ref, dest: None)
    assert not list(cache.images.glob("*.sif"))


def test_partial_of_a_dead_conversion_is_cleaned_up(cache, archive):
    digest = cache.digest_of(ref_of(archive))
    cache._make_dirs()
    dead = cache.images / (".%s.999999.partial" % digest[7:])
    dead.write_bytes(b"left by a killed conversion")
    cache.ensure(ref_of(archive))
    assert not dead.exists()


def test_concurrent_ensure_in_three_processes_builds_once(tmp_path, archive):
    root, record, go = tmp_path / "cache", tmp_path / "calls.txt", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-m", "tests.containers.ensure_worker", str(root),
                               "docker-archive:%s" % archive, str(record), str(go), "fake"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    time.sleep(0.3)
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    paths = {out.strip() for out, _ in outs}
    assert paths == {str(SifCache(root).path_for(sha(archive.read_bytes())))}
    assert len(record.read_text().splitlines()) == 1
    assert not list((root / "sha256").glob("*partial*"))


def test_waiter_reopens_a_lock_file_that_prune_replaced(cache, archive):
    digest = cache.digest_of(ref_of(archive))
    cache._make_dirs()
    result = {}
    with cache._lock(digest, exclusive=True, wait=True):
        t = threading.Thread(target=lambda: result.update(path=cache.ensure(ref_of(archive))))
        t.start()
        time.sleep(0.3)
        assert t.is_alive()                          # waiting on our lock
        cache.lock_path(digest).unlink()             # what prune does while holding it
    t.join(10)
    assert result["path"].is_file()
    assert cache.lock_path(digest).exists()          # the waiter locked a fresh lock file


def make_entries(cache, tmp_path, ages):
    """One entry per age (seconds since last use), 10 kB each; returns their digests."""
    digests = []
    now = time.time()
    for i, age in enumerate(ages):
        path = tmp_path / ("img%d.tar" % i)
        path.write_bytes(b"%d" % i * 10)
        ref = ref_of(path)
        cache.ensure(ref, builder=FakeBuilder(content=b"x" * 10_000))
        digest = cache.digest_of(ref)
        os.utime(cache.images / (digest[7:] + ".used"), (now - age, now - age))
        digests.append(digest)
    return digests


def test_entries(cache, tmp_path):
    a, b = make_entries(cache, tmp_path, [10, 500])
    same = tmp_path / "copy.tar"
    same.write_bytes((tmp_path / "img0.tar").read_bytes())
    cache.ensure(ref_of(same))
    entries = cache.entries()
    assert [e.digest for e in entries] == [b, a]
    assert entries[1] == CacheEntry(a, cache.path_for(a), 10_000, entries[1].last_used,
                                    tuple(sorted(["docker-archive:%s" % (tmp_path / "img0.tar"),
                                                  "docker-archive:%s" % same])))
    assert time.time() - entries[0].last_used == pytest.approx(500, abs=5)


def test_prune_by_age_never_removes_a_locked_entry(cache, tmp_path):
    old, locked, fresh = make_entries(cache, tmp_path, [7200, 7200, 60])
    fd = os.open(cache.lock_path(locked), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)               # a conversion in progress
        removed = cache.prune(older_than_s=3600)
    finally:
        os.close(fd)
    assert [e.digest for e in removed] == [old]
    assert not cache.path_for(old).exists()
    assert not (cache.images / (old[7:] + ".used")).exists()
    assert not cache.lock_path(old).exists()
    assert cache.path_for(locked).exists() and cache.path_for(fresh).exists()
    assert {r["digest"] for r in cache._records().values()} == {locked, fresh}
    assert [e.digest for e in cache.prune(older_than_s=3600)] == [locked]


def test_prune_by_size_removes_least_recently_used_first(cache, tmp_path):
    a, b, c, d = make_entries(cache, tmp_path, [100, 400, 300, 200])
    with cache.hold(c) as path:
        assert path == cache.path_for(c)
        removed = cache.prune(max_bytes=20_000)
    assert [e.digest for e in removed] == [b, d]     # c is held: skipped, d goes instead
    assert {e.digest for e in cache.entries()} == {a, c}
    assert cache.prune(max_bytes=20_000) == []
    assert [e.digest for e in cache.prune(max_bytes=0)] == [c, a]
    assert cache.entries() == [] and cache._records() == {}


def test_prune_drops_records_of_changed_files_and_dead_partials(cache, tmp_path, archive):
    cache.ensure(ref_of(archive))
    archive.write_bytes(b"new content")
    cache.ensure(ref_of(archive))
    assert len(cache._records()) == 2
    dead = cache.images / (".%s.999999.partial" % HEX)
    dead.write_bytes(b"x")
    assert cache.prune(older_than_s=3600) == []
    assert [r["digest"] for r in cache._records().values()] == [sha(b"new content")]
    assert not dead.exists() and not (cache.images / (HEX + ".lock")).exists()
    archive.unlink()
    cache.prune(older_than_s=3600)
    assert cache._records() == {}
    assert len(cache.entries()) == 2                 # images stay until old or over size


def test_prune_needs_a_limit(cache):
    with pytest.raises(ValueError, match="prune needs max_bytes or older_than_s"):
        cache.prune()
