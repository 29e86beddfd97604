"""Threshold tables with exact boundaries for every check (pure: facts in, verdict out)."""
from dataclasses import replace

import pytest

from monitor.checks import (CHECK_NAMES, HARD_CHECKS, Status, check_apptainer_run, check_fs_scratch_free,
                            check_fs_shared_free, check_fs_shared_mounted, check_fs_shared_writable,
                            check_gpu_devices, check_gpu_nvidia_smi, check_gpu_retired_pages, check_gpu_xid,
                            check_munge_roundtrip, check_of_reason, check_slurm_gres, is_hard_failure, run_checks)
from monitor.config import HealthConfig
from monitor.facts import Facts
from monitor.parse import GpuStatus

C = HealthConfig(scratch_min_free_mb=1024, shared_min_free_mb=2048, gpu_max_retired_pending=0, gpu_max_xid_errors=0)
GOOD = Facts(node="g4n1", configured_gpus=4, gpu_devices={"/dev/nvidia%d" % i: 195 for i in range(4)}, slurmd_gpus=4,
             free_mb={"scratch": 5000, "shared": 5000}, shared_fstype="nfs4", shared_seconds=0.1, apptainer_seconds=0.2)


def gpus(n, major=195, missing=()):
    return {"/dev/nvidia%d" % i: (None if i in missing else major) for i in range(n)}


@pytest.mark.parametrize("devices,configured,status,value", [
    (gpus(4), 4, Status.PASS, "4"),
    (gpus(4, missing=(2,)), 4, Status.FAIL, "3"),
    (gpus(3), 4, Status.FAIL, "3"),
    (gpus(1), 1, Status.PASS, "1"),
    (gpus(1, missing=(0,)), 1, Status.FAIL, "0"),
    (gpus(4, major=1), 4, Status.FAIL, "0"),            # wrong major number (not an NVIDIA device)
    ({"/dev/nvidia0": -1}, 1, Status.FAIL, "0"),         # a regular file, not a character device
    ({}, 0, Status.SKIP, ""),                            # a node without GPUs
])
def test_gpu_devices(devices, configured, status, value):
    v = check_gpu_devices(replace(GOOD, gpu_devices=devices, configured_gpus=configured), C)
    assert (v.status, v.value) == (status, value)
    if status is not Status.SKIP:
        assert v.limit == str(configured)


def test_gpu_devices_reason_names_check_value_and_limit():
    v = check_gpu_devices(replace(GOOD, gpu_devices=gpus(4, missing=(0,))), C)
    assert v.reason() == "aiportal: gpu_devices: 3 (limit 4)"
    assert "/dev/nvidia0 missing" in v.detail


@pytest.mark.parametrize("slurmd,status", [(4, Status.PASS), (3, Status.FAIL), (5, Status.FAIL), (0, Status.FAIL)])
def test_slurm_gres_must_equal_the_configured_count(slurmd, status):
    v = check_slurm_gres(replace(GOOD, slurmd_gpus=slurmd), C)
    assert (v.status, v.value, v.limit) == (status, str(slurmd), "=4")


def test_slurm_gres_skipped_when_devices_are_missing_and_failing_on_error():
    v = check_slurm_gres(replace(GOOD, skipped={"slurmd_gres": "not asked: device files missing"}), C)
    assert v.status is Status.SKIP
    v = check_slurm_gres(replace(GOOD, errors={"slurmd_gres": "slurmd -N g4n1 -G: no answer in 5s"}), C)
    assert (v.status, v.value) == (Status.FAIL, "unknown") and "no answer" in v.detail


@pytest.mark.parametrize("check", [check_gpu_nvidia_smi, check_gpu_retired_pages, check_gpu_xid])
def test_nvidia_checks_are_skipped_without_a_driver_and_say_so(check):
    v = check(replace(GOOD, driver=False, skipped={"nvidia": "no NVIDIA driver here (/dev/nvidiactl missing): skipped"}), C)
    assert v.status is Status.SKIP and "no NVIDIA driver" in v.detail


def smi(*pending):
    return tuple(GpuStatus(i, "00000000:%02X:00.0" % i, p) for i, p in enumerate(pending))


@pytest.mark.parametrize("seen,status", [(4, Status.PASS), (3, Status.FAIL), (5, Status.PASS)])
def test_nvidia_smi_sees_the_configured_gpus(seen, status):
    v = check_gpu_nvidia_smi(replace(GOOD, driver=True, gpus=smi(*[False] * seen)), C)
    assert (v.status, v.value, v.limit) == (status, str(seen), "4")


def test_nvidia_smi_not_answering_fails():
    v = check_gpu_nvidia_smi(replace(GOOD, driver=True, errors={"nvidia_smi": "nvidia-smi: no answer in 5s"}), C)
    assert v.status is Status.FAIL


@pytest.mark.parametrize("limit,pending,status", [
    (0, (False, False, False, False), Status.PASS),
    (0, (True, False, False, False), Status.FAIL),
    (1, (True, False, False, False), Status.PASS),
    (1, (True, True, False, False), Status.FAIL),
])
def test_retired_pages_pending(limit, pending, status):
    v = check_gpu_retired_pages(replace(GOOD, driver=True, gpus=smi(*pending)), replace(C, gpu_max_retired_pending=limit))
    assert (v.status, v.value, v.limit) == (status, str(sum(pending)), str(limit))


@pytest.mark.parametrize("limit,xids,status,value", [
    (0, (), Status.PASS, "0"),
    (0, (79,), Status.FAIL, "1"),
    (0, (13, 31), Status.PASS, "0"),          # application errors (13, 31) are not fatal XIDs
    (1, (48,), Status.PASS, "1"),
    (1, (48, 79), Status.FAIL, "2"),
])
def test_xid_errors(limit, xids, status, value):
    v = check_gpu_xid(replace(GOOD, driver=True, xids=xids), replace(C, gpu_max_xid_errors=limit))
    assert (v.status, v.value, v.limit) == (status, value, str(limit))


def test_xid_skipped_when_the_kernel_log_cannot_be_read():
    v = check_gpu_xid(replace(GOOD, driver=True, skipped={"xid": "kernel log unreadable"}), C)
    assert v.status is Status.SKIP


@pytest.mark.parametrize("free,status", [(1025, Status.PASS), (1024, Status.PASS), (1023, Status.FAIL), (0, Status.FAIL)])
def test_scratch_free_boundary(free, status):
    v = check_fs_scratch_free(replace(GOOD, free_mb={"scratch": free, "shared": 5000}), C)
    assert (v.status, v.value, v.limit) == (status, "%dMB" % free, "1024MB")


@pytest.mark.parametrize("free,status", [(2049, Status.PASS), (2048, Status.PASS), (2047, Status.FAIL)])
def test_shared_free_boundary(free, status):
    v = check_fs_shared_free(replace(GOOD, free_mb={"scratch": 5000, "shared": free}), C)
    assert (v.status, v.value, v.limit) == (status, "%dMB" % free, "2048MB")


def test_free_space_unknown_fails_with_the_probe_error():
    v = check_fs_scratch_free(replace(GOOD, free_mb={}, errors={"scratch": "/tmp: no answer in 5s"}), C)
    assert (v.status, v.value) == (Status.FAIL, "unknown") and "no answer" in v.detail


def test_shared_mounted():
    assert check_fs_shared_mounted(GOOD, C).status is Status.SKIP          # plain folder (dev cluster)
    real = replace(C, shared_mount="/shared")
    assert check_fs_shared_mounted(GOOD, real).status is Status.PASS
    v = check_fs_shared_mounted(replace(GOOD, shared_fstype=None), real)
    assert (v.status, v.value, v.limit) == (Status.FAIL, "not mounted", "mounted")


def test_shared_writable_and_its_timeout():
    assert check_fs_shared_writable(GOOD, C).status is Status.PASS
    v = check_fs_shared_writable(replace(GOOD, errors={"shared": "/srv/aiportal/shared: no answer in 5s"}), C)
    assert (v.status, v.value, v.limit) == (Status.FAIL, "unknown", "5s")
    assert v.reason() == "aiportal: shared_writable: unknown (limit 5s)"


def test_munge_and_apptainer():
    assert check_munge_roundtrip(GOOD, C).status is Status.PASS
    assert check_munge_roundtrip(replace(GOOD, errors={"munge": "munge -n: exit 1"}), C).status is Status.FAIL
    assert check_apptainer_run(GOOD, C).status is Status.PASS
    v = check_apptainer_run(replace(GOOD, errors={"apptainer": "probe image missing"}), C)
    assert v.status is Status.FAIL


def test_run_checks_in_order_with_skips_from_configuration():
    verdicts = run_checks(GOOD, replace(C, skip_checks=("munge",)))
    assert [v.check for v in verdicts] == list(CHECK_NAMES)
    assert {v.check: v.status for v in verdicts}["munge"] is Status.SKIP
    assert not any(v.failed for v in verdicts)


def test_a_watchdog_timeout_is_a_failure():
    verdicts = run_checks(replace(GOOD, errors={"watchdog": "still running at the deadline: shared",
                                                "shared": "no answer before the watchdog"}), C)
    failed = [v.check for v in verdicts if v.failed]
    assert failed == ["shared_writable", "shared_free", "watchdog"]


@pytest.mark.parametrize("reason,check,hard", [
    ("aiportal: gpu_devices: 3 (limit 4)", "gpu_devices", True),
    ("aiportal: shared_writable: unknown (limit 5s)", "shared_writable", True),
    ("aiportal: scratch_free: 0MB (limit 1024MB)", "scratch_free", False),
    ("replacing GPU 2 (admin)", None, False),
    ("aiportal-test: drain test", None, False),
    ("  aiportal: gpu_devices: 0 (limit 1)", "gpu_devices", True),
    ("AIPORTAL: gpu_devices: 0 (limit 1)", None, False),
    ("aiportal: no check named here", None, False),
])
def test_reasons_are_ours_or_not(reason, check, hard):
    assert check_of_reason(reason) == check
    assert is_hard_failure(reason) is hard


def test_hard_checks_are_checks():
    assert HARD_CHECKS - {"watchdog"} <= set(CHECK_NAMES)
