#!/usr/bin/env python3
"""Prepare the CIFAR-10 dataset in its binary format and upload it to the S3 store.

Two sources, one layout (``DEST/cifar-10-batches-bin/``: ``data_batch_1.bin`` ..
``data_batch_5.bin``, ``test_batch.bin``, ``batches.meta.txt``):

* ``--archive PATH_OR_URL``: the real dataset, ``cifar-10-binary.tar.gz`` from
  https://www.cs.toronto.edu/~kriz/cifar.html, from a local file or a URL the site can reach;
* ``--synthetic``: a deterministic stand-in written offline in exactly the same format (for
  sites that cannot download it, and for tests). Every class has its own shape and colours,
  placed at a random offset, with per-pixel noise: a CNN learns it, so the loss visibly goes
  down, but it is not CIFAR-10 and its accuracy says nothing about real images.

Each record is 1 label byte (0-9) and 3,072 pixel bytes: the 1,024 red values of the 32x32
image row by row, then the 1,024 green, then the 1,024 blue; 10,000 records per file.

``--upload s3://BUCKET/PREFIX`` (with ``--credentials FILE``: a data-source file as
``aiportal stage`` reads it, mode 0600) sends the dataset there with ``aiportal stage out``;
``--upload-code s3://BUCKET/PREFIX`` sends ``train.py`` and ``model.py`` (a job stages both
prefixes into ``/data/data``). Standard library only: runs with any Python 3.9+.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zlib
from pathlib import Path
from typing import Iterator

LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SIZE = 32
CHANNELS = 3
IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE * CHANNELS      # 3072
RECORD_BYTES = 1 + IMAGE_BYTES                        # 3073
RECORDS_PER_FILE = 10000
FOLDER = "cifar-10-batches-bin"
TRAIN_FILES = tuple("data_batch_%d.bin" % i for i in range(1, 6))
TEST_FILE = "test_batch.bin"
META_FILE = "batches.meta.txt"
#: md5 of cifar-10-binary.tar.gz as published on the dataset's page
ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"


class DataError(Exception):
    """A dataset that cannot be prepared; the message says what to do."""


# -- the format ------------------------------------------------------------------------------

def encode_record(label: int, pixels: bytes) -> bytes:
    """One record: the label byte, then the planar R, G, B pixels (3,072 bytes)."""
    if not 0 <= label < len(LABELS):
        raise ValueError("label %r is not 0-9" % (label,))
    if len(pixels) != IMAGE_BYTES:
        raise ValueError("a CIFAR-10 image is %d bytes, got %d" % (IMAGE_BYTES, len(pixels)))
    return bytes((label,)) + pixels


def decode_record(record: bytes) -> tuple[int, bytes]:
    """(label, planar pixels) of one record."""
    if len(record) != RECORD_BYTES:
        raise ValueError("a CIFAR-10 record is %d bytes, got %d" % (RECORD_BYTES, len(record)))
    if record[0] >= len(LABELS):
        raise ValueError("label byte %d is not 0-9" % record[0])
    return record[0], record[1:]


def read_batch(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """The (label, pixels) records of one batch file, in order."""
    size = os.path.getsize(path)
    if size % RECORD_BYTES:
        raise DataError("%s is %d bytes, not a whole number of %d-byte records" % (path, size, RECORD_BYTES))
    with open(path, "rb") as f:
        while chunk := f.read(RECORD_BYTES):
            yield decode_record(chunk)


def pixel(pixels: bytes, x: int, y: int) -> tuple[int, int, int]:
    """The (r, g, b) value at column ``x``, row ``y`` of planar pixels."""
    i = y * IMAGE_SIZE + x
    plane = IMAGE_SIZE * IMAGE_SIZE
    return pixels[i], pixels[plane + i], pixels[2 * plane + i]


def check_dataset(folder: Path, train_files: int = 5) -> list[Path]:
    """The batch files of a prepared dataset; raises DataError naming what is missing or wrong."""
    names = list(TRAIN_FILES[:train_files]) + [TEST_FILE]
    out = []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataError("%s is missing" % path)
        size = path.stat().st_size
        if size != RECORD_BYTES * RECORDS_PER_FILE:
            raise DataError("%s is %d bytes; a CIFAR-10 batch file is %d" % (path, size, RECORD_BYTES * RECORDS_PER_FILE))
        out.append(path)
    return out


# -- the synthetic stand-in -------------------------------------------------------------------

# foreground and background colours per class, at most 191 so that noise (0-63) never carries
_COLOURS = (
    ((191, 40, 40), (20, 20, 60)), ((40, 191, 40), (60, 20, 20)), ((40, 40, 191), (20, 60, 20)),
    ((191, 191, 40), (30, 30, 30)), ((191, 40, 191), (20, 50, 50)), ((40, 191, 191), (50, 20, 50)),
    ((191, 120, 40), (20, 40, 70)), ((120, 40, 191), (60, 60, 20)), ((150, 150, 150), (10, 40, 10)),
    ((40, 120, 120), (90, 20, 20)),
)
_SHIFT = 8          # shapes are placed at offsets 0..7 in x and y
_NOISE = bytes(b & 63 for b in range(256))     # translate table: a random byte -> noise 0..63


def _in_shape(cls: int, x: int, y: int) -> bool:
    """Class ``cls``'s shape at (x, y), relative to its offset (coordinates wrap at 32)."""
    cx, cy = x - 12, y - 12             # the shape's centre sits at (12 + dx, 12 + dy)
    r2 = cx * cx + cy * cy
    return (
        (y % 8) < 4,                                  # airplane: horizontal stripes
        (x % 8) < 4,                                  # automobile: vertical stripes
        ((x + y) % 8) < 4,                            # bird: diagonal stripes
        ((x // 4) + (y // 4)) % 2 == 0,               # cat: checkerboard
        r2 <= 64,                                     # deer: a disc
        36 <= r2 <= 100,                              # dog: a ring
        abs(cx) <= 7 and abs(cy) <= 7,                # frog: a square
        abs(cx) <= 2 or abs(cy) <= 2,                 # horse: a cross
        abs(cx - cy) <= 1 or abs(cx + cy) <= 1,       # ship: an X
        (abs(cx) <= 8 and abs(cy) <= 8) and not (abs(cx) <= 5 and abs(cy) <= 5),   # truck: a frame
    )[cls]


def _templates() -> list[list[int]]:
    """Per class, per offset: the noiseless image as a big-endian integer (so that adding the
    noise's integer adds byte by byte: no byte exceeds 191 + 63, nothing carries)."""
    out = []
    for cls in range(len(LABELS)):
        (fr, fg, fb), (br, bg, bb) = _COLOURS[cls]
        tables = [bytes.maketrans(b"\0\1", bytes((b, f))) for f, b in ((fr, br), (fg, bg), (fb, bb))]
        per_class = []
        for dy in range(_SHIFT):
            for dx in range(_SHIFT):
                mask = bytes(_in_shape(cls, (x - dx) % IMAGE_SIZE, (y - dy) % IMAGE_SIZE)
                             for y in range(IMAGE_SIZE) for x in range(IMAGE_SIZE))
                per_class.append(int.from_bytes(b"".join(mask.translate(t) for t in tables), "big"))
        out.append(per_class)
    return out


def synthetic_records(seed: int, name: str, count: int = RECORDS_PER_FILE,
                      templates: list[list[int]] | None = None) -> Iterator[bytes]:
    """The records of synthetic batch file ``name``: balanced labels in a shuffled order, each
    image its class's shape at a random offset plus noise. The same (seed, name) gives the same
    bytes with any Python 3.9+ (``random.Random`` seeded with a string is stable)."""
    rng = random.Random("aiportal-cifar10:%d:%s" % (seed, name))
    templates = templates or _templates()
    labels = [i % len(LABELS) for i in range(count)]
    rng.shuffle(labels)
    for label in labels:
        base = templates[label][rng.randrange(_SHIFT * _SHIFT)]
        noise = int.from_bytes(rng.randbytes(IMAGE_BYTES).translate(_NOISE), "big")
        yield bytes((label,)) + (base + noise).to_bytes(IMAGE_BYTES, "big")


def write_synthetic(dest: Path, seed: int = 0, train_files: int = 5) -> list[Path]:
    """Write ``dest/cifar-10-batches-bin/`` with ``train_files`` training files (1-5), the test
    file and the label names. Returns the batch files written."""
    if not 1 <= train_files <= len(TRAIN_FILES):
        raise DataError("--train-files must be 1-%d, got %d" % (len(TRAIN_FILES), train_files))
    folder = Path(dest) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    templates = _templates()
    written = []
    for name in list(TRAIN_FILES[:train_files]) + [TEST_FILE]:
        path = folder / name
        tmp = path.with_name("." + name + ".partial")
        with open(tmp, "wb") as f:
            f.write(b"".join(synthetic_records(seed, name, templates=templates)))
        os.replace(tmp, path)
        written.append(path)
    (folder / META_FILE).write_text("\n".join(LABELS) + "\n\n")
    return written


# -- the real archive -------------------------------------------------------------------------

def fetch_archive(source: str, workdir: Path, timeout: float = 60.0) -> Path:
    """A local path as is; an http(s) URL downloaded into ``workdir``."""
    scheme = urllib.parse.urlsplit(source).scheme
    if scheme in ("http", "https"):
        dest = workdir / "cifar-10-binary.tar.gz"
        print("downloading %s" % source, file=sys.stderr)
        try:
            with urllib.request.urlopen(source, timeout=timeout) as resp, open(dest, "wb") as f:
                shutil.copyfileobj(resp, f, 1 << 20)
        except OSError as e:
            raise DataError("cannot download %s (%s); download it where you can and pass the file "
                            "with --archive PATH, or use --synthetic" % (source, e)) from e
        return dest
    path = Path(source[len("file://"):] if scheme == "file" else source)
    if not path.is_file():
        raise DataError("no archive at %s; pass cifar-10-binary.tar.gz with --archive PATH" % path)
    return path


def extract_archive(archive: Path, dest: Path, verify_md5: bool = True) -> list[Path]:
    """Extract the batch files and label names of ``cifar-10-binary.tar.gz`` into
    ``dest/cifar-10-batches-bin/`` (only those names, as regular files: nothing else in the
    archive is written). Checks the archive's md5 unless ``verify_md5`` is off."""
    if verify_md5:
        h = hashlib.md5()
        with open(archive, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != ARCHIVE_MD5:
            raise DataError("%s has md5 %s, not the published %s of cifar-10-binary.tar.gz; pass "
                            "--no-verify to use it anyway" % (archive, h.hexdigest(), ARCHIVE_MD5))
    folder = Path(dest) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    wanted = set(TRAIN_FILES) | {TEST_FILE, META_FILE}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                parts = member.name.split("/")
                if len(parts) != 2 or parts[0] != FOLDER or parts[1] not in wanted or not member.isfile():
                    continue
                src = tar.extractfile(member)
                tmp = folder / ("." + parts[1] + ".partial")
                with src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.replace(tmp, folder / parts[1])
    except (tarfile.TarError, EOFError) as e:
        raise DataError("%s is not a readable tar archive: %s" % (archive, e)) from e
    return check_dataset(folder)


# -- upload -----------------------------------------------------------------------------------

def default_aiportal() -> str:
    return shutil.which("aiportal") or "/opt/aiportal/venv/bin/aiportal"


def upload(folder: Path, uri: str, credentials: str, aiportal: str) -> None:
    """``aiportal stage out --from FOLDER --to URI``: parallel, checksummed, resumable."""
    argv = [aiportal, "stage", "out", "--from", str(folder), "--to", uri, "--credentials", credentials]
    print("uploading %s -> %s" % (folder, uri), file=sys.stderr)
    try:
        res = subprocess.run(argv, check=False, timeout=3600)
    except FileNotFoundError as e:
        raise DataError("%s not found; pass --aiportal PATH (the aiportal command of the site)" % aiportal) from e
    if res.returncode != 0:
        raise DataError("%s exited %d" % (" ".join(argv), res.returncode))


def dataset_tree(dest: Path, workdir: Path) -> Path:
    """``workdir/cifar-10-batches-bin/`` holding hard links to the dataset's files: only the
    dataset travels, not whatever else ``dest`` holds (staging skips symlinks)."""
    folder = workdir / FOLDER
    folder.mkdir()
    for f in sorted((Path(dest) / FOLDER).iterdir()):
        if f.is_file() and not f.name.startswith("."):
            os.link(f, folder / f.name)
    return workdir


def png(pixels: bytes, scale: int = 1) -> bytes:
    """A CIFAR-10 image (planar RGB) as a PNG file (standard library only), ``scale`` times larger."""
    size = IMAGE_SIZE * scale
    rows = b"".join(b"\x00" + bytes(c for x in range(size) for c in pixel(pixels, x // scale, y // scale))
                    for y in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + (zlib.crc32(kind + data) & 0xFFFFFFFF).to_bytes(4, "big"))
    header = size.to_bytes(4, "big") * 2 + bytes((8, 2, 0, 0, 0))      # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def write_samples(dataset: Path, dest: Path, count: int = 4) -> list[Path]:
    """The first ``count`` test images as ``dest/I-LABEL.png`` (96x96), to send to a served model."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (label, pixels) in enumerate(read_batch(dataset / FOLDER / "test_batch.bin")):
        if i >= count:
            break
        path = dest / ("%d-%s.png" % (i, LABELS[label]))
        path.write_bytes(png(pixels, scale=3))
        out.append(path)
    return out


def stage_code(workdir: Path) -> Path:
    """A folder with the training program and the model class (what the job runs)."""
    here = Path(__file__).resolve().parent
    code = workdir / "code"
    code.mkdir()
    for name in ("train.py", "model.py"):
        shutil.copy2(here / name, code / name)
    return code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n"
                                       "  prepare_data.py --synthetic --dest /tmp/cifar\n"
                                       "  prepare_data.py --archive cifar-10-binary.tar.gz --dest /tmp/cifar \\\n"
                                       "      --upload s3://datasets/cifar10/data --upload-code s3://datasets/cifar10/code \\\n"
                                       "      --credentials ~/s3.json")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", action="store_true", help="write the deterministic offline stand-in")
    src.add_argument("--archive", metavar="PATH_OR_URL",
                     help="cifar-10-binary.tar.gz (a file, or %s when the site can reach it)" % ARCHIVE_URL)
    p.add_argument("--dest", required=True, type=Path, help="folder to write cifar-10-batches-bin/ into")
    p.add_argument("--seed", type=int, default=0, help="synthetic: the seed (default 0)")
    p.add_argument("--train-files", type=int, default=5, help="synthetic: training files, 1-5 (default 5)")
    p.add_argument("--no-verify", action="store_true", help="archive: skip the md5 check")
    p.add_argument("--upload", metavar="S3_URI", help="upload the dataset to s3://BUCKET/PREFIX")
    p.add_argument("--upload-code", metavar="S3_URI", help="upload train.py and model.py to s3://BUCKET/PREFIX")
    p.add_argument("--credentials", help="data-source file for the uploads (JSON, mode 0600)")
    p.add_argument("--aiportal", default=None, help="the aiportal command (default: from PATH)")
    p.add_argument("--samples", metavar="DIR", type=Path,
                   help="also write the first test images as DIR/I-LABEL.png (to send to a served model)")
    args = p.parse_args(argv)
    if (args.upload or args.upload_code) and not args.credentials:
        p.error("--upload and --upload-code need --credentials FILE")
    for uri in (args.upload, args.upload_code):
        if uri is not None and not uri.startswith("s3://"):
            p.error("--upload and --upload-code take s3://BUCKET/PREFIX, got %r" % uri)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.synthetic:
            files = write_synthetic(args.dest, seed=args.seed, train_files=args.train_files)
        else:
            with tempfile.TemporaryDirectory(prefix="cifar10-") as tmp:
                files = extract_archive(fetch_archive(args.archive, Path(tmp)), args.dest,
                                        verify_md5=not args.no_verify)
        print("%s: %d batch files, %d records" % (args.dest / FOLDER, len(files), len(files) * RECORDS_PER_FILE))
        if args.samples:
            print("samples: %s" % " ".join(str(p) for p in write_samples(args.dest, args.samples)))
        aiportal = args.aiportal or default_aiportal()
        if args.upload:
            with tempfile.TemporaryDirectory(prefix="cifar10-upload-", dir=args.dest) as tmp:
                upload(dataset_tree(args.dest, Path(tmp)), args.upload, args.credentials, aiportal)
        if args.upload_code:
            with tempfile.TemporaryDirectory(prefix="cifar10-code-") as tmp:
                upload(stage_code(Path(tmp)), args.upload_code, args.credentials, aiportal)
    except DataError as e:
        print("prepare_data: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
