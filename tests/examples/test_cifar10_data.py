"""The CIFAR-10 dataset preparation (examples/cifar10/prepare_data.py), with the host's Python
only: the binary format, the deterministic synthetic stand-in (and that it is learnable), the
archive extraction, and the command line. Nothing is downloaded."""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from tests.examples.conftest import load_example

pd = load_example("prepare_data")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def one_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    pd.write_synthetic(root, seed=0, train_files=1)
    return root / pd.FOLDER


def test_record_round_trip():
    pixels = bytes(range(256)) * 12
    record = pd.encode_record(7, pixels)
    assert len(record) == pd.RECORD_BYTES == 3073 and record[0] == 7
    assert pd.decode_record(record) == (7, pixels)
    # planar layout: R plane, G plane, B plane, each row by row
    assert pd.pixel(pixels, 0, 0) == (0, 0, 0)
    assert pd.pixel(pixels, 5, 1) == (37, 37, 37)


@pytest.mark.parametrize("label, pixels, message", [
    (10, bytes(3072), "not 0-9"),
    (-1, bytes(3072), "not 0-9"),
    (0, bytes(3071), "3072 bytes"),
    (0, bytes(3073), "3072 bytes"),
])
def test_encode_refuses_bad_records(label, pixels, message):
    with pytest.raises(ValueError, match=message):
        pd.encode_record(label, pixels)


@pytest.mark.parametrize("record, message", [
    (bytes(3072), "3073 bytes"),
    (bytes((10,)) + bytes(3072), "label byte 10"),
])
def test_decode_refuses_bad_records(record, message):
    with pytest.raises(ValueError, match=message):
        pd.decode_record(record)


def test_synthetic_files_have_the_exact_format(one_file):
    names = sorted(p.name for p in one_file.iterdir())
    assert names == ["batches.meta.txt", "data_batch_1.bin", "test_batch.bin"]
    assert pd.check_dataset(one_file, train_files=1) == [one_file / "data_batch_1.bin", one_file / "test_batch.bin"]
    for name in ("data_batch_1.bin", "test_batch.bin"):
        assert (one_file / name).stat().st_size == 10000 * 3073
        labels = [label for label, _ in pd.read_batch(one_file / name)]
        assert len(labels) == 10000
        assert [labels.count(c) for c in range(10)] == [1000] * 10     # balanced
        assert labels[:20] != sorted(labels[:20])                     # and shuffled
    assert (one_file / "batches.meta.txt").read_text().split() == list(pd.LABELS)
    assert pd.LABELS == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def test_synthetic_data_is_deterministic(one_file, tmp_path):
    pd.write_synthetic(tmp_path / "again", seed=0, train_files=1)
    pd.write_synthetic(tmp_path / "other", seed=1, train_files=1)
    for name in ("data_batch_1.bin", "test_batch.bin"):
        assert sha(tmp_path / "again" / pd.FOLDER / name) == sha(one_file / name)
        assert sha(tmp_path / "other" / pd.FOLDER / name) != sha(one_file / name)
    # the training and the test file are different images
    assert sha(one_file / "data_batch_1.bin") != sha(one_file / "test_batch.bin")


def test_synthetic_classes_are_learnable(one_file):
    """A nearest-centroid classifier on mean colours, fitted on training images, labels most test
    images right: the classes carry a signal a CNN will find (and images differ within a class)."""
    def features(pixels: bytes) -> tuple[float, float, float]:
        return tuple(sum(pixels[i * 1024:(i + 1) * 1024]) / 1024 for i in range(3))

    sums = {c: [0.0, 0.0, 0.0, 0] for c in range(10)}
    for i, (label, pixels) in enumerate(pd.read_batch(one_file / "data_batch_1.bin")):
        if i == 3000:
            break
        f = features(pixels)
        s = sums[label]
        s[0], s[1], s[2], s[3] = s[0] + f[0], s[1] + f[1], s[2] + f[2], s[3] + 1
    centroids = {c: (s[0] / s[3], s[1] / s[3], s[2] / s[3]) for c, s in sums.items()}
    right = total = 0
    class0 = []
    for i, (label, pixels) in enumerate(pd.read_batch(one_file / "test_batch.bin")):
        if i == 1000:
            break
        f = features(pixels)
        guess = min(centroids, key=lambda c: sum((a - b) ** 2 for a, b in zip(f, centroids[c])))
        right += guess == label
        total += 1
        if label == 0:
            class0.append(pixels)
    assert right / total > 0.9
    assert len(class0) > 50 and len(set(class0)) == len(class0)     # no two images alike


def test_check_dataset_names_what_is_wrong(tmp_path, one_file):
    with pytest.raises(pd.DataError, match="data_batch_1.bin is missing"):
        pd.check_dataset(tmp_path, train_files=1)
    (tmp_path / "data_batch_1.bin").write_bytes(bytes(3073 * 10))
    with pytest.raises(pd.DataError, match="a CIFAR-10 batch file is 30730000"):
        pd.check_dataset(tmp_path, train_files=1)
    (tmp_path / "short.bin").write_bytes(bytes(3074))
    with pytest.raises(pd.DataError, match="not a whole number"):
        list(pd.read_batch(tmp_path / "short.bin"))


@pytest.mark.parametrize("train_files", [0, 6])
def test_write_synthetic_refuses_bad_counts(tmp_path, train_files):
    with pytest.raises(pd.DataError, match="1-5"):
        pd.write_synthetic(tmp_path, train_files=train_files)


def _archive(tmp_path: Path, source: Path) -> Path:
    """A tarball laid out like cifar-10-binary.tar.gz, plus members that must not be written."""
    path = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(path, "w") as tar:      # uncompressed: noise does not compress
        for f in sorted(source.iterdir()):
            tar.add(f, arcname="%s/%s" % (pd.FOLDER, f.name))
        for name in ("../evil.bin", "/tmp/aiportal-evil.bin", "%s/readme.html" % pd.FOLDER):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        link = tarfile.TarInfo("%s/data_batch_9.bin" % pd.FOLDER)
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    return path


def test_extract_archive_writes_only_the_dataset(tmp_path):
    src = tmp_path / "src"
    pd.write_synthetic(src, seed=3, train_files=5)
    archive = _archive(tmp_path, src / pd.FOLDER)
    with pytest.raises(pd.DataError, match="--no-verify"):
        pd.extract_archive(archive, tmp_path / "dest")          # not the published md5
    files = pd.extract_archive(archive, tmp_path / "dest", verify_md5=False)
    out = tmp_path / "dest" / pd.FOLDER
    assert [f.name for f in files] == ["data_batch_%d.bin" % i for i in range(1, 6)] + ["test_batch.bin"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (src / pd.FOLDER).iterdir())
    for f in files:
        assert sha(f) == sha(src / pd.FOLDER / f.name)
    assert not (tmp_path / "evil.bin").exists() and not Path("/tmp/aiportal-evil.bin").exists()


def test_extract_refuses_a_file_that_is_not_a_tarball(tmp_path):
    bad = tmp_path / "x.tar.gz"
    bad.write_bytes(b"not a tar file")
    with pytest.raises(pd.DataError, match="not a readable tar archive"):
        pd.extract_archive(bad, tmp_path / "dest", verify_md5=False)


def test_fetch_says_what_to_do_when_there_is_no_archive(tmp_path):
    with pytest.raises(pd.DataError, match="--archive PATH"):
        pd.fetch_archive(str(tmp_path / "missing.tar.gz"), tmp_path)
    # a URL the site cannot reach (a closed loopback port: fails at once, nothing is downloaded)
    with pytest.raises(pd.DataError, match="--synthetic"):
        pd.fetch_archive("http://127.0.0.1:9/cifar-10-binary.tar.gz", tmp_path, timeout=5)
    (tmp_path / "local.tar.gz").touch()
    assert pd.fetch_archive("file://%s" % (tmp_path / "local.tar.gz"), tmp_path) == tmp_path / "local.tar.gz"


@pytest.mark.parametrize("argv, message", [
    (["--dest", "d"], "one of the arguments --synthetic --archive is required"),
    (["--synthetic", "--archive", "a.tgz", "--dest", "d"], "not allowed with"),
    (["--synthetic", "--dest", "d", "--upload", "s3://b/p"], "need --credentials"),
    (["--synthetic", "--dest", "d", "--upload-code", "s3://b/p"], "need --credentials"),
    (["--synthetic", "--dest", "d", "--upload", "gs://b/p", "--credentials", "c"], "take s3://BUCKET/PREFIX"),
])
def test_command_line_refuses_incomplete_requests(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        pd.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_command_line_writes_the_dataset(tmp_path, capsys):
    assert pd.main(["--synthetic", "--dest", str(tmp_path), "--train-files", "1", "--seed", "5"]) == 0
    assert "2 batch files, 20000 records" in capsys.readouterr().out
    assert pd.main(["--archive", str(tmp_path / "none.tgz"), "--dest", str(tmp_path)]) == 1
    assert "no archive at" in capsys.readouterr().err
    assert pd.main(["--synthetic", "--dest", str(tmp_path), "--train-files", "1", "--upload", "s3://b/p",
                    "--credentials", "c", "--aiportal", str(tmp_path / "no-aiportal")]) == 1
    assert "pass --aiportal PATH" in capsys.readouterr().err


def test_samples_are_pngs_of_the_test_images(prepare_data, tmp_path):
    import struct
    import zlib
    prepare_data.write_synthetic(tmp_path, seed=0, train_files=1)
    paths = prepare_data.write_samples(tmp_path, tmp_path / "samples", count=2)
    records = list(prepare_data.read_batch(tmp_path / "cifar-10-batches-bin" / "test_batch.bin"))[:2]
    assert [p.name for p in paths] == ["%d-%s.png" % (i, prepare_data.LABELS[r[0]]) for i, r in enumerate(records)]
    data = paths[0].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    assert (width, height, depth, colour) == (96, 96, 8, 2)
    idat_len = struct.unpack(">I", data[33:37])[0]
    rows = zlib.decompress(data[41:41 + idat_len])
    # pixel (x=5, y=7) of the record is the 3x3 block at (15..17, 21..23)
    row = rows[(21) * (1 + 96 * 3):][1:]
    assert tuple(row[15 * 3:15 * 3 + 3]) == prepare_data.pixel(records[0][1], 5, 7)
