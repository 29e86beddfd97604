"""Local (shared-filesystem) staging: incremental, atomic, safe with concurrent writers."""
import os
import threading

import pytest

from storage.errors import StagingError
from storage.local import copy_tree
from storage.stage import stage_in, stage_out
from storage.uris import Scheme, parse_location


def make_tree(root):
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "deep.bin").write_bytes(os.urandom(100_000))
    (root / "empty.txt").write_text("")
    (root / "ünï cödé.txt").write_text("x")
    return root


def files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_copy_tree_then_second_run_skips_everything(tmp_path):
    src = make_tree(tmp_path / "src")
    first = copy_tree(src, tmp_path / "dst")
    assert (first.files, first.copied, first.skipped) == (3, 3, 0)
    assert files(tmp_path / "dst") == files(src)
    assert (tmp_path / "dst" / "a" / "b" / "deep.bin").read_bytes() == (src / "a" / "b" / "deep.bin").read_bytes()
    second = copy_tree(src, tmp_path / "dst")
    assert (second.copied, second.skipped) == (0, 3)
    (src / "empty.txt").write_text("changed")
    third = copy_tree(src, tmp_path / "dst")
    assert third.copied == 1 and (tmp_path / "dst" / "empty.txt").read_text() == "changed"


def test_single_file_lands_inside_the_directory(tmp_path):
    (tmp_path / "f.txt").write_text("1")
    copy_tree(tmp_path / "f.txt", tmp_path / "d")
    assert (tmp_path / "d" / "f.txt").read_text() == "1"


def test_missing_source(tmp_path):
    with pytest.raises(StagingError, match="does not exist"):
        copy_tree(tmp_path / "nope", tmp_path / "d")
    assert copy_tree(tmp_path / "nope", tmp_path / "d", missing_ok=True).files == 0


def test_concurrent_writers_of_the_same_tree_do_not_collide(tmp_path):
    src = make_tree(tmp_path / "src")
    errors = []

    def worker():
        try:
            copy_tree(src, tmp_path / "dst")
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert files(tmp_path / "dst") == files(src)
    assert not [p for p in (tmp_path / "dst").rglob("*partial*")]


def test_symlinks_are_not_followed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "link").symlink_to("/etc/passwd")
    assert copy_tree(src, tmp_path / "dst").files == 0
    assert not (tmp_path / "dst" / "link").exists()


@pytest.mark.parametrize("text, scheme", [("/shared/x", Scheme.SHARED), ("file:///shared/x", Scheme.SHARED),
                                          ("s3://bucket/prefix", Scheme.S3)])
def test_locations(text, scheme):
    assert parse_location(text).scheme is scheme


@pytest.mark.parametrize("text, message", [("relative/x", "relative paths"), ("http://x/y", "unknown scheme"),
                                           ("s3://", "name the bucket"), ("", "absolute path"), ("/a\nb", "absolute path")])
def test_bad_locations(text, message):
    with pytest.raises(StagingError, match=message):
        parse_location(text)


def test_s3_without_credentials_is_refused_before_any_request(tmp_path):
    with pytest.raises(StagingError, match="no data source credentials for this job"):
        stage_in("s3://bucket/p", str(tmp_path))
    (tmp_path / "out").mkdir()
    with pytest.raises(StagingError, match="no data source credentials for this job"):
        stage_out(str(tmp_path / "out"), "s3://bucket/p")
