#!/usr/bin/env python3
"""Train the classic CIFAR-10 CNN (TensorFlow 2 / Keras 3) with checkpoints that survive requeues.

Reads the CIFAR-10 binary format (``data_batch_*.bin`` in ``--data_dir`` or in its
``cifar-10-batches-bin/``; ``prepare_data.py`` writes it) and writes to ``--output_dir``:

* ``checkpoints/``: every ``--checkpoint_every`` steps, on SIGUSR1/SIGUSR2 (Slurm sends
  ``--signal=B:USR1@120`` to the batch script, which passes it on) and on SIGTERM/SIGINT
  (checkpoint, then exit 143/130). On start the newest checkpoint there is restored and the
  log says ``resuming from step N``, so a requeued or preempted job continues where it stopped;
* ``model/model.keras``: the final model (Keras format; ``model.py`` loads it for inference);
* ``metrics.json``: steps, losses, throughput and, when ``test_batch.bin`` is there, the test
  accuracy.

Each ``--log_every`` steps it prints ``step N, loss = X (Y examples/sec; Z sec/batch)``, the
line the portal plots. Training: 24x24 random crops, left-right flips, random brightness and
contrast, per-image standardisation; plain SGD at 0.1 decayed by 10x every 350 epochs; the
reported loss is cross-entropy plus weight decay, as in the TensorFlow tutorial.

GPUs: one replica per GPU TensorFlow can use (``--num_gpus`` caps it; ``--batch_size`` is per
replica). Slurm sets ``CUDA_VISIBLE_DEVICES`` for the GPUs it allocated; where TensorFlow sees
none of them (no NVIDIA driver, a CPU-only TensorFlow, or the dev cluster's fake GPU devices)
the log says so and training runs on the CPU as one replica.

Argument parsing and the GPU plan need only the standard library (TensorFlow is imported by
:func:`main`), so they are tested without TensorFlow.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RECORD_BYTES = 1 + 32 * 32 * 3
BIN_FOLDER = "cifar-10-batches-bin"
TRAIN_PATTERN = "data_batch_*.bin"
TEST_FILE = "test_batch.bin"
EXAMPLES_PER_EPOCH = 50000
EPOCHS_PER_DECAY = 350
CHECKPOINT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def say(message: str) -> None:
    """One timestamped line on stdout, flushed at once (the job log is a file, block-buffered)."""
    print("%s: %s" % (datetime.datetime.now().isoformat(sep=" ", timespec="seconds"), message), flush=True)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1, got %d" % value)
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more, got %d" % value)
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the CIFAR-10 CNN; checkpoints and resumes in --output_dir.")
    p.add_argument("--data_dir", default="/data/data",
                   help="folder with data_batch_*.bin, or with cifar-10-batches-bin/ (default /data/data)")
    p.add_argument("--output_dir", default="/data/output",
                   help="checkpoints/, model/model.keras and metrics.json go here (default /data/output)")
    p.add_argument("--max_steps", type=_positive, default=20000, help="train until this global step (default 20000)")
    p.add_argument("--batch_size", type=_positive, default=128, help="examples per step and replica (default 128)")
    p.add_argument("--num_gpus", type=_non_negative, default=None,
                   help="use at most this many GPUs, one replica each (default: every GPU TensorFlow sees; "
                        "0: the CPU)")
    p.add_argument("--checkpoint_every", type=_positive, default=1000, help="steps between checkpoints (default 1000)")
    p.add_argument("--log_every", type=_positive, default=10, help="steps between progress lines (default 10)")
    p.add_argument("--keep_checkpoints", type=_positive, default=3, help="checkpoints kept (default 3)")
    p.add_argument("--learning_rate", type=float, default=0.1, help="initial learning rate (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--eval_examples", type=_non_negative, default=10000,
                   help="test_batch.bin examples to evaluate at the end (default 10000: all; 0: none)")
    args = p.parse_args(argv)
    if args.learning_rate <= 0:
        p.error("--learning_rate must be positive")
    return args


def find_batches(data_dir: str | os.PathLike) -> tuple[list[Path], Path | None]:
    """The training files (sorted) and the test file (or None) under ``data_dir``, its
    ``cifar-10-batches-bin/``, or one folder below it (a shared-filesystem input is bound at
    /data/data/NAME). Raises FileNotFoundError saying where it looked."""
    root = Path(data_dir)
    below = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for folder in (root, root / BIN_FOLDER, *below, *(p / BIN_FOLDER for p in below)):
        train = sorted(folder.glob(TRAIN_PATTERN))
        if train:
            bad = [f for f in train if f.stat().st_size % RECORD_BYTES]
            if bad:
                raise ValueError("%s is not in the CIFAR-10 binary format (%d-byte records)" % (bad[0], RECORD_BYTES))
            test = folder / TEST_FILE
            return train, (test if test.is_file() else None)
    raise FileNotFoundError("no %s in %s, %s or a folder below it; stage the dataset in (prepare_data.py "
                            "writes it)" % (TRAIN_PATTERN, root, root / BIN_FOLDER))


@dataclass(frozen=True)
class GpuPlan:
    replicas: int           #: GPU replicas; 0 means one replica on the CPU
    message: str


def plan_gpus(requested: int | None, cuda_visible: str | None, tf_gpus: int) -> GpuPlan:
    """How many GPU replicas to run: every GPU TensorFlow sees, at most ``requested``.

    ``cuda_visible`` is ``CUDA_VISIBLE_DEVICES`` (what Slurm allocated); ``tf_gpus`` is how many
    GPUs TensorFlow can use. Slurm may allocate GPUs that TensorFlow cannot use (no driver, a
    CPU-only build, fake devices): the message says so and the plan is the CPU."""
    allocated = [d for d in (cuda_visible or "").split(",") if d.strip()]
    seen = "CUDA_VISIBLE_DEVICES=%s (%d GPU(s) allocated); TensorFlow sees %d GPU(s)" % (
        cuda_visible if cuda_visible is not None else "<unset>", len(allocated), tf_gpus)
    if requested == 0:
        return GpuPlan(0, "%s; --num_gpus 0: training on the CPU" % seen)
    if tf_gpus == 0:
        why = (" (no NVIDIA driver in the container, a CPU-only TensorFlow build, or devices that are not "
               "real GPUs)" if allocated else "")
        return GpuPlan(0, "%s%s; training on the CPU with one replica" % (seen, why))
    n = tf_gpus if requested is None else min(requested, tf_gpus)
    extra = (" (asked for %d)" % requested) if requested is not None and requested > tf_gpus else ""
    return GpuPlan(n, "%s; training with %d replica(s), one per GPU%s" % (seen, n, extra))


@dataclass
class SignalFlags:
    """What signals asked for, set by handlers and read by the training loop between steps."""

    checkpoint: list[str] = field(default_factory=list)     #: names of checkpoint signals not yet served
    stop: str | None = None                                 #: name of the first stop signal

    def install(self) -> None:
        for sig in CHECKPOINT_SIGNALS:
            signal.signal(sig, self._on_checkpoint)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_stop)

    def _on_checkpoint(self, signum, frame) -> None:
        self.checkpoint.append(signal.Signals(signum).name)

    def _on_stop(self, signum, frame) -> None:
        if self.stop is None:
            self.stop = signal.Signals(signum).name


def stop_exit_code(name: str) -> int:
    """128 + the signal number, the shell's convention for a program ended by a signal."""
    return 128 + int(getattr(signal, name))


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(".%s.%d.tmp" % (path.name, os.getpid()))
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flags = SignalFlags()
    flags.install()                 # before the slow imports: a signal then is not fatal
    say("train.py started (pid %d): max_steps %d, batch_size %d per replica, checkpoint_every %d, output %s"
        % (os.getpid(), args.max_steps, args.batch_size, args.checkpoint_every, args.output_dir))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    train_files, test_file = find_batches(args.data_dir)
    out = Path(args.output_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)

    import keras
    import tensorflow as tf

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import model as net_lib         # the network, shared with the inference class

    plan = plan_gpus(args.num_gpus, os.environ.get("CUDA_VISIBLE_DEVICES"),
                     len(tf.config.list_physical_devices("GPU")))
    say(plan.message)
    if plan.replicas > 1:
        strategy = tf.distribute.MirroredStrategy(["/gpu:%d" % i for i in range(plan.replicas)])
    elif plan.replicas == 1:
        strategy = tf.distribute.OneDeviceStrategy("/gpu:0")
    else:
        strategy = tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    global_batch = args.batch_size * replicas
    say("host %s, TensorFlow %s, %d replica(s), %d examples per step; data: %s"
        % (socket.gethostname(), tf.__version__, replicas, global_batch, ", ".join(f.name for f in train_files)))

    with strategy.scope():
        net = net_lib.build_network()
        decay_steps = max(1, EXAMPLES_PER_EPOCH * EPOCHS_PER_DECAY // global_batch)
        lr = keras.optimizers.schedules.ExponentialDecay(args.learning_rate, decay_steps, 0.1, staircase=True)
        optimizer = keras.optimizers.SGD(learning_rate=lr)
        optimizer.build(net.trainable_variables)
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    ckpt = tf.train.Checkpoint(model=net, optimizer=optimizer, step=step_var)
    manager = tf.train.CheckpointManager(ckpt, str(out / "checkpoints"), max_to_keep=args.keep_checkpoints,
                                         checkpoint_name="ckpt")
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        say("resuming from step %d (checkpoint %s)" % (int(step_var.numpy()), Path(manager.latest_checkpoint).name))
    else:
        say("starting at step 0 (no checkpoint in %s)" % (out / "checkpoints"))
    start_step = step = int(step_var.numpy())

    def save(reason: str) -> None:
        step_var.assign(step)
        path = manager.save(checkpoint_number=step)
        say("checkpoint at step %d (%s): %s" % (step, reason, Path(path).name))

    # -- input pipeline ----------------------------------------------------------------------
    def decode(record):
        raw = tf.io.decode_raw(record, tf.uint8)
        image = tf.transpose(tf.reshape(raw[1:], (3, net_lib.IMAGE_SIZE, net_lib.IMAGE_SIZE)), (1, 2, 0))
        return image, tf.cast(raw[0], tf.int32)

    def distort(image, label):
        image = tf.cast(image, tf.float32)
        image = tf.image.random_crop(image, (net_lib.CROP_SIZE, net_lib.CROP_SIZE, 3))
        image = tf.image.random_flip_left_right(image)
        image = tf.image.random_brightness(image, max_delta=63)
        image = tf.image.random_contrast(image, lower=0.2, upper=1.8)
        return tf.image.per_image_standardization(image), label

    tf.random.set_seed(args.seed + start_step)      # a resumed run does not replay the same batches
    ds = (tf.data.FixedLengthRecordDataset([str(f) for f in train_files], RECORD_BYTES, buffer_size=1 << 20)
          .shuffle(10000, seed=args.seed + start_step).repeat()
          .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
          .map(distort, num_parallel_calls=tf.data.AUTOTUNE)
          .batch(global_batch, drop_remainder=True)
          .prefetch(tf.data.AUTOTUNE))
    batches = iter(strategy.experimental_distribute_dataset(ds))

    # -- one step --------------------------------------------------------------------------
    def replica_step(images, labels):
        with tf.GradientTape() as tape:
            logits = net(images, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            xent = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            loss = xent + tf.nn.scale_regularization_loss(tf.add_n(net.losses))
        grads = tape.gradient(loss, net.trainable_variables)
        optimizer.apply_gradients(zip(grads, net.trainable_variables))
        return loss, xent

    @tf.function
    def train_step(batch):
        loss, xent = strategy.run(replica_step, args=batch)
        return (strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, xent, axis=None))

    # -- the loop --------------------------------------------------------------------------
    history: list[tuple[int, float]] = []
    rates: list[float] = []
    t_last, step_last = time.monotonic(), step
    t_start = t_last
    last_saved = step if manager.latest_checkpoint else None
    loss = xent = None
    cpu_mark: tuple[int, float] | None = None       # (step, process CPU seconds) after the first interval
    while step < args.max_steps and flags.stop is None:
        loss, xent = train_step(next(batches))
        step += 1
        if step % args.log_every == 0 or step == args.max_steps:
            value = float(loss)             # waits for the step: the timing below is real
            now = time.monotonic()
            sec_per_batch = (now - t_last) / (step - step_last)
            rate = global_batch / sec_per_batch
            if step_last != start_step:     # the first interval includes tracing
                rates.append(rate)
            else:
                cpu_mark = (step, time.process_time())
            say("step %d, loss = %.4f (%.1f examples/sec; %.3f sec/batch)" % (step, value, rate, sec_per_batch))
            history.append((step, value))
            t_last, step_last = now, step
        if flags.checkpoint:
            save("got %s" % ", ".join(flags.checkpoint))
            flags.checkpoint.clear()
            last_saved = step
        elif step % args.checkpoint_every == 0 and step < args.max_steps:
            save("every %d steps" % args.checkpoint_every)
            last_saved = step
    train_seconds = time.monotonic() - t_start

    if last_saved != step:
        save(("got %s, stopping" % flags.stop) if flags.stop else "end of training")
    metrics = {
        "state": "stopped" if flags.stop else "finished",
        "final_step": step, "max_steps": args.max_steps, "start_step": start_step,
        "resumed": start_step > 0, "steps_this_run": step - start_step,
        "batch_size_per_replica": args.batch_size, "global_batch_size": global_batch, "replicas": replicas,
        "gpus_used": plan.replicas, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "host": socket.gethostname(), "tensorflow": tf.__version__,
        "train_seconds": round(train_seconds, 3),
        "examples_per_sec": round(sum(rates) / len(rates), 1) if rates else None,
        # CPU time of all the process's threads per 1,000 examples after the first interval: what the
        # work costs, whatever else the machine runs (examples/sec depends on that)
        "cpu_seconds_per_1000_examples": (round((time.process_time() - cpu_mark[1]) * 1000
                                                / ((step - cpu_mark[0]) * global_batch), 4)
                                          if cpu_mark and step > cpu_mark[0] else None),
        "loss_history": history,
        "final_loss": float(loss) if loss is not None else None,
        "final_cross_entropy": float(xent) if xent is not None else None,
    }
    if flags.stop:
        write_json(out / "metrics.json", metrics)
        say("stopped by %s at step %d; the next run resumes from there" % (flags.stop, step))
        return stop_exit_code(flags.stop)

    model_dir = out / "model"
    model_dir.mkdir(exist_ok=True)
    tmp = model_dir / (".partial-%d.keras" % os.getpid())
    net.save(tmp)
    os.replace(tmp, model_dir / net_lib.MODEL_FILE)
    say("model saved: %s" % (model_dir / net_lib.MODEL_FILE))
    if test_file is not None and args.eval_examples:
        metrics["test_accuracy"], metrics["test_examples"] = evaluate(tf, net, net_lib, test_file, decode,
                                                                      args.eval_examples)
        say("test accuracy = %.4f on %d examples (%s)" % (metrics["test_accuracy"], metrics["test_examples"],
                                                           test_file.name))
    write_json(out / "metrics.json", metrics)
    say("done: step %d of %d (%d this run)" % (step, args.max_steps, step - start_step))
    return 0


def evaluate(tf, net, net_lib, test_file: Path, decode, limit: int) -> tuple[float, int]:
    """Accuracy on the first ``limit`` examples of ``test_file``, centrally cropped."""
    ds = (tf.data.FixedLengthRecordDataset([str(test_file)], RECORD_BYTES).take(limit)
          .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
          .map(lambda image, label: (net_lib.eval_crop(image), label), num_parallel_calls=tf.data.AUTOTUNE)
          .batch(500))

    @tf.function
    def predict(images):
        return tf.argmax(net(images, training=False), axis=-1, output_type=tf.int32)

    right = total = 0
    for images, labels in ds:
        right += int(tf.reduce_sum(tf.cast(tf.equal(predict(images), labels), tf.int32)))
        total += int(labels.shape[0])
    return (right / total if total else 0.0), total


if __name__ == "__main__":
    sys.exit(main())
