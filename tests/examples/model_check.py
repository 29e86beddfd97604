"""Checks of the CIFAR-10 inference class, run INSIDE the TensorFlow image (no pytest there):

    apptainer exec --bind examples/cifar10:/code --bind tests/examples:/checks --bind OUT:/model \\
        tensorflow.sif python3 /checks/model_check.py /model --min-accuracy 0.9

Images from the synthetic test set are encoded as PNG and JPEG (and at other sizes, in
grayscale, with alpha) and sent as file-like objects, as the serving runtime will. Prints one
JSON line with what it measured; exits non-zero (with the reason) when a check fails.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time

sys.path.insert(0, "/code")

import tensorflow as tf  # noqa: E402

import model as cifar  # noqa: E402
import prepare_data  # noqa: E402


def hwc(pixels: bytes) -> tf.Tensor:
    """Planar CIFAR pixels -> a 32x32x3 uint8 image."""
    return tf.transpose(tf.reshape(tf.constant(list(pixels), tf.uint8), (3, 32, 32)), (1, 2, 0))


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--test-file", default="/data/cifar-10-batches-bin/test_batch.bin")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--min-accuracy", type=float, default=0.0)
    args = p.parse_args()

    check(cifar.LABELS == prepare_data.LABELS, "model.LABELS and prepare_data.LABELS differ")
    clf = cifar.Cifar10Classifier(args.model_dir)
    try:
        clf.execute([b"x"], 1)
        raise AssertionError("execute before load_model did not fail")
    except RuntimeError as e:
        check("load_model()" in str(e), str(e))
    t0 = time.monotonic()
    clf.load_model()
    load_s = time.monotonic() - t0

    truth, png, jpeg = [], [], []
    for i, (label, pixels) in enumerate(prepare_data.read_batch(args.test_file)):
        if i == args.images:
            break
        image = hwc(pixels)
        truth.append(cifar.LABELS[label])
        png.append(tf.io.encode_png(image).numpy())
        jpeg.append(tf.io.encode_jpeg(image, quality=95).numpy())
    check(png[0][:8] == b"\x89PNG\r\n\x1a\n" and jpeg[0][:2] == b"\xff\xd8", "not PNG/JPEG bytes")

    t0 = time.monotonic()
    by_png = clf.execute([io.BytesIO(b) for b in png], batch_size=16)
    exec_s = time.monotonic() - t0
    by_jpeg = clf.execute([io.BytesIO(b) for b in jpeg], batch_size=16)
    check(len(by_png) == len(by_jpeg) == len(truth), "one label per image")
    check(all(label in cifar.LABELS for label in by_png + by_jpeg), "labels outside the 10 classes")
    # the batch size changes how the work is split, not the answers; bytes work as well as files
    check(clf.execute(png, batch_size=1) == by_png, "batch_size=1 gave other labels")
    check(clf.execute([io.BytesIO(b) for b in png], batch_size=1000) == by_png, "one big batch gave other labels")
    acc_png = sum(a == b for a, b in zip(by_png, truth)) / len(truth)
    acc_jpeg = sum(a == b for a, b in zip(by_jpeg, truth)) / len(truth)
    agree = sum(a == b for a, b in zip(by_png, by_jpeg)) / len(truth)
    check(acc_png >= args.min_accuracy and acc_jpeg >= args.min_accuracy,
          "accuracy PNG %.2f, JPEG %.2f, below %.2f" % (acc_png, acc_jpeg, args.min_accuracy))

    # other sizes and channel counts: resized to 32x32, gray -> RGB, alpha dropped
    big = tf.image.resize(hwc(next(prepare_data.read_batch(args.test_file))[1]), (96, 128), method="nearest")
    others = [tf.io.encode_png(tf.cast(big, tf.uint8)).numpy(),
              tf.io.encode_png(tf.zeros((20, 20, 1), tf.uint8)).numpy(),
              tf.io.encode_png(tf.fill((32, 32, 4), tf.constant(200, tf.uint8))).numpy(),
              tf.io.encode_jpeg(tf.zeros((300, 40, 3), tf.uint8)).numpy()]
    labels_other = clf.execute([io.BytesIO(b) for b in others], batch_size=4)
    check(len(labels_other) == 4 and all(label in cifar.LABELS for label in labels_other), repr(labels_other))

    # what is not an image is refused with its position
    for bad, words in (([png[0], png[1], b"GIF89a-not-really"], "item 2"), ([png[0], b""], "item 1"),
                       ([io.BytesIO(b"\x89PNG\r\n\x1a\n broken")], "item 0")):
        try:
            clf.execute(bad, batch_size=2)
            raise AssertionError("%r was accepted" % bad[-1][:20])
        except ValueError as e:
            check(words in str(e), "%r does not name %s" % (str(e), words))
    try:
        clf.execute(png[:1], batch_size=0)
        raise AssertionError("batch_size=0 was accepted")
    except ValueError:
        pass

    print(json.dumps({"images": len(truth), "accuracy_png": acc_png, "accuracy_jpeg": acc_jpeg,
                      "png_jpeg_agree": agree, "load_s": round(load_s, 3), "execute_s": round(exec_s, 3),
                      "model_file": str(cifar.find_model_file(args.model_dir)), "sample": by_png[:5]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
