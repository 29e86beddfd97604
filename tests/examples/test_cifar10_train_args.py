"""examples/cifar10/train.py without TensorFlow: its command line, where it finds the data, how
it plans GPU replicas from what Slurm allocated and what TensorFlow sees, and its signal flags
(in a child process, so pytest keeps its own handlers)."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from tests.examples.conftest import EXAMPLE, load_example

train = load_example("train")


def test_defaults_follow_the_platform_contract():
    args = train.parse_args([])
    assert (args.data_dir, args.output_dir) == ("/data/data", "/data/output")
    assert args.num_gpus is None and args.batch_size == 128 and args.checkpoint_every == 1000
    args = train.parse_args(["--max_steps", "300", "--batch_size", "32", "--num_gpus", "0",
                             "--checkpoint_every", "100", "--data_dir", "/d", "--output_dir", "/o"])
    assert (args.max_steps, args.batch_size, args.num_gpus, args.checkpoint_every) == (300, 32, 0, 100)
    assert (args.data_dir, args.output_dir) == ("/d", "/o")


@pytest.mark.parametrize("argv, message", [
    (["--max_steps", "0"], "must be at least 1"),
    (["--batch_size", "-4"], "must be at least 1"),
    (["--checkpoint_every", "0"], "must be at least 1"),
    (["--num_gpus", "-1"], "must be 0 or more"),
    (["--max_steps", "ten"], "invalid"),
    (["--learning_rate", "0"], "must be positive"),
    (["--unknown"], "unrecognized arguments"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("requested, visible, tf_gpus, replicas, says", [
    # the dev cluster: Slurm allocates fake GPUs that TensorFlow cannot use -> the CPU, and the log says so
    (None, "0,1,2,3", 0, 0, ["CUDA_VISIBLE_DEVICES=0,1,2,3 (4 GPU(s) allocated)", "TensorFlow sees 0",
                             "devices that are not real GPUs", "on the CPU with one replica"]),
    (None, "0", 0, 0, ["CUDA_VISIBLE_DEVICES=0 (1 GPU(s)", "on the CPU"]),
    (None, None, 0, 0, ["CUDA_VISIBLE_DEVICES=<unset> (0 GPU(s)", "on the CPU with one replica"]),
    (4, "", 0, 0, ["(0 GPU(s) allocated)", "on the CPU"]),
    # real GPUs: one replica each, capped by --num_gpus
    (None, "0,1,2,3", 4, 4, ["training with 4 replica(s), one per GPU"]),
    (None, "2", 1, 1, ["training with 1 replica(s)"]),
    (2, "0,1,2,3", 4, 2, ["training with 2 replica(s)"]),
    (8, "0,1", 2, 2, ["training with 2 replica(s), one per GPU (asked for 8)"]),
    (0, "0,1,2,3", 4, 0, ["--num_gpus 0: training on the CPU"]),
])
def test_gpu_plan(requested, visible, tf_gpus, replicas, says):
    plan = train.plan_gpus(requested, visible, tf_gpus)
    assert plan.replicas == replicas
    for text in says:
        assert text in plan.message


def test_finds_the_batches_in_the_folder_or_its_cifar_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        train.find_batches(tmp_path)
    nested = tmp_path / "cifar-10-batches-bin"
    nested.mkdir()
    for name in ("data_batch_2.bin", "data_batch_1.bin"):
        (nested / name).write_bytes(bytes(3073 * 2))
    assert train.find_batches(tmp_path) == ([nested / "data_batch_1.bin", nested / "data_batch_2.bin"], None)
    (nested / "test_batch.bin").write_bytes(bytes(3073))
    assert train.find_batches(nested)[1] == nested / "test_batch.bin"
    (nested / "data_batch_3.bin").write_bytes(bytes(3000))
    with pytest.raises(ValueError, match="data_batch_3.bin is not in the CIFAR-10 binary format"):
        train.find_batches(tmp_path)


def test_stop_exit_codes():
    assert train.stop_exit_code("SIGTERM") == 143
    assert train.stop_exit_code("SIGINT") == 130


def test_signals_ask_for_a_checkpoint_or_a_stop_and_never_kill():
    """USR1/USR2 queue checkpoints; TERM/INT set the stop (the first one wins); the process lives on."""
    script = textwrap.dedent("""
        import importlib.util, os, signal, sys
        spec = importlib.util.spec_from_file_location("train", sys.argv[1])
        train = sys.modules["train"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(train)
        flags = train.SignalFlags(); flags.install()
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
            os.kill(os.getpid(), sig)
        print(flags.checkpoint, flags.stop)
    """)
    res = subprocess.run([sys.executable, "-c", script, str(EXAMPLE / "train.py")], capture_output=True,
                         text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "['SIGUSR1', 'SIGUSR2'] SIGTERM"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL     # pytest's own process is untouched


def test_finds_the_batches_of_a_bound_input_one_folder_below(tmp_path):
    """A shared-filesystem input is bound at /data/data/NAME: the default --data_dir finds it."""
    bound = tmp_path / "cifar10"
    bound.mkdir()
    (bound / "data_batch_1.bin").write_bytes(bytes(3073))
    (tmp_path / "other").mkdir()
    assert train.find_batches(tmp_path) == ([bound / "data_batch_1.bin"], None)
