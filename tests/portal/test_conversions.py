"""A failed image conversion in words: the error taken from the end of its log (logs recorded on
the dev cluster), and the reason a job that waited on a failed job is ended with."""
from dataclasses import replace

import pytest

from portal.services.conversions import (LOG_TAIL_BYTES, MAX_ERROR, conversion_error, dependency_reason,
                                         ended_words, read_conversion_error)
from slurm.jobs import JobStatus
from slurm.states import JobState

HEX = "65bdb173acf7994c504b2778e9ebb61245aaa47ca6b34e94004e51bd79763a19"
PROGRESS = """[aiportal image] hashing docker-archive:/srv/aiportal/shared/images/cache/incoming/%s.tar
[aiportal image] converting docker-archive:/srv/aiportal/shared/images/cache/incoming/%s.tar to \
/srv/aiportal/shared/images/cache/sha256/%s.sif
[aiportal image] building /srv/aiportal/shared/images/cache/sha256/.%s.12421.partial from \
docker-archive:/srv/aiportal/shared/images/cache/incoming/%s.tar
""" % ((HEX,) * 5)
# a docker-archive that is not one (aiportal image convert, as aiportal-img)
BAD_ARCHIVE = PROGRESS + (
    "aiportal: `apptainer build --force --mksquashfs-args '-comp zstd -Xcompression-level 3' "
    "/srv/aiportal/shared/images/cache/sha256/.%s.12421.partial docker-archive:/x/bad.tar` exited 255: FATAL:   "
    "While performing build: conveyor failed to get: error reading the docker archive file: unexpected EOF\n" % HEX)
# the builder account after a root conversion left Apptainer's cache folders root-owned (the old bug)
ROOT_OWNED_CACHE = PROGRESS + (
    "aiportal: `apptainer build --force --mksquashfs-args '-comp zstd -Xcompression-level 3' /c/sha256/.x.partial "
    "oci-archive:/x/image-oci.tar` exited 255: FATAL:   Failed to create an image cache handle: failed initializing "
    "caching directory: unable to stat /c/apptainer/cache/cache/library: stat /c/apptainer/cache/cache/library: "
    "permission denied\n")
# a definition whose %post fails (root's build; the command's last lines come first)
POST_FAILS = """[aiportal image] building /x/bad.def as root in /var/tmp/aiportal-def-klq2ykkh (a definition's \
bootstrap needs root); aiportal-img then puts the image into the cache
[aiportal image] the last lines apptainer printed:
    about to fail
    INFO:    Running post scriptlet
    + echo about to fail
    + false
    FATAL:   While performing build: while running engine: while running %post section: exit status 1
aiportal: `apptainer build --force /var/tmp/aiportal-def-klq2ykkh/image.sif /x/bad.def` exited 255: FATAL:   While \
performing build: while running engine: while running %post section: exit status 1
"""


@pytest.mark.parametrize("log, error", [
    (BAD_ARCHIVE, "While performing build: conveyor failed to get: error reading the docker archive file: "
                  "unexpected EOF"),
    (ROOT_OWNED_CACHE, "Failed to create an image cache handle: failed initializing caching directory: unable to "
                       "stat /c/apptainer/cache/cache/library: stat /c/apptainer/cache/cache/library: permission "
                       "denied"),
    (POST_FAILS, "While performing build: while running engine: while running %post section: exit status 1"),
    # apptainer colours its FATAL on a terminal
    ("\x1b[91mFATAL:  \x1b[0m  While performing build: boom\n", "While performing build: boom"),
    # a command that failed without FATAL: the program and what happened, not its arguments
    (PROGRESS + "aiportal: `apptainer build --force /c/x.partial docker-archive:/x.tar` timed out (gave up after "
                "1800.0s; raise the build timeout)\n",
     "apptainer build timed out (gave up after 1800.0s; raise the build timeout)"),
    ("aiportal: `/usr/bin/skopeo copy oci:/x oci-archive:/y` exited 1\n", "skopeo copy exited 1"),
    ("aiportal: `apptainer --debug build x y` exited 1\n", "apptainer exited 1"),
    # the command's own refusal
    ("aiportal: the image cache /c is not writable by aiportal-img, which should own it: repair it with "
     "`make provision`\n",
     "the image cache /c is not writable by aiportal-img, which should own it: repair it with `make provision`"),
    # Slurm ended it
    (PROGRESS + "slurmstepd: error: *** JOB 700 ON g1n1 CANCELLED AT 2026-12-06T15:00:00 DUE TO TIME LIMIT ***\n",
     "JOB 700 ON g1n1 CANCELLED AT 2026-12-06T15:00:00 DUE TO TIME LIMIT"),
    # Python died
    ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
     "PermissionError: [Errno 13] Permission denied: '/c/refs'\n", "PermissionError: [Errno 13] Permission denied: "
                                                                   "'/c/refs'"),
    # nothing that says why
    (PROGRESS, ""), ("", ""), ("\n\n", ""),
])
def test_conversion_error(log, error):
    assert conversion_error(log) == error


def test_conversion_error_is_cut_to_a_readable_length():
    got = conversion_error("FATAL: " + "x" * 5000)
    assert len(got) == MAX_ERROR and got.endswith("...")


@pytest.fixture
def cache_settings(settings, tmp_path):
    (tmp_path / "cache" / "logs").mkdir(parents=True)
    return replace(settings, image_cache=str(tmp_path / "cache"))


def _log(settings, job_id, text):
    from pathlib import Path
    (Path(settings.image_cache) / "logs" / ("convert-%s.out" % job_id)).write_text(text)


def test_read_conversion_error_reads_the_end_of_a_long_log(cache_settings):
    _log(cache_settings, "700", "FATAL: an old error\n" + "[aiportal image] progress\n" * (LOG_TAIL_BYTES // 10)
         + BAD_ARCHIVE)
    assert read_conversion_error(cache_settings, "700").endswith("unexpected EOF")


def test_read_conversion_error_without_a_log_is_empty_and_logged(cache_settings, caplog):
    assert read_conversion_error(cache_settings, "701") == ""
    assert "cannot read its log" in caplog.text and "convert-701.out" in caplog.text


CONVERSION = JobStatus("700", JobState.FAILED, "NonZeroExitCode", "g1n1", 2, 0, "aiportal-img",
                       "aiportal:image:sha256:" + HEX, "convert-65bdb173acf7")


@pytest.mark.parametrize("record, words", [
    (CONVERSION, "FAILED with exit code 2"),
    (JobStatus("1", JobState.CANCELLED), "CANCELLED"),
    (JobStatus("1", JobState.TIMEOUT, exit_code=0, signal=0), "TIMEOUT"),
    (JobStatus("1", JobState.FAILED, exit_code=0, signal=9), "FAILED (signal 9)"),
    (None, ""),
])
def test_ended_words(record, words):
    assert ended_words(record) == words


def test_a_failed_conversion_is_named_with_its_own_error(cache_settings):
    _log(cache_settings, "700", BAD_ARCHIVE)
    assert dependency_reason(cache_settings, "700", CONVERSION) == (
        "a job it depends on (700, its image conversion) ended without success: While performing build: conveyor "
        "failed to get: error reading the docker archive file: unexpected EOF")


def test_a_conversion_without_a_log_says_how_it_ended(cache_settings):
    assert dependency_reason(cache_settings, "700", CONVERSION) == (
        "a job it depends on (700, its image conversion) ended without success: FAILED with exit code 2")


@pytest.mark.parametrize("record, reason", [
    (JobStatus("650", JobState.FAILED, "NonZeroExitCode", "g1n1", 1, 0, "alice"),
     "a job it depends on (650) ended without success: FAILED with exit code 1"),
    (JobStatus("650", JobState.CANCELLED, user="alice"), "a job it depends on (650) ended without success: CANCELLED"),
    (None, "a job it depends on (650) ended without success"),
])
def test_any_other_job_is_named_with_how_it_ended(cache_settings, record, reason):
    _log(cache_settings, "650", BAD_ARCHIVE)        # a log of that name is not what makes a conversion
    assert dependency_reason(cache_settings, "650", record) == reason
