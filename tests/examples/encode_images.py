"""Images of the CIFAR-10 test set as PNG and JPEG files, written INSIDE the TensorFlow image (no
image library on the host; the same encoders model_check.py uses):

    apptainer exec --bind examples/cifar10:/code --bind tests/examples:/checks --bind DATA:/data \\
        --bind OUT:/out tensorflow.sif python3 /checks/encode_images.py /data/cifar-10-batches-bin/test_batch.bin \\
        /out --count 4

Writes ``OUT/I-LABEL.png`` and ``OUT/I-LABEL.jpg`` for the first COUNT records and prints one
JSON line: ``[{"label": LABEL, "png": NAME, "jpeg": NAME}, ...]``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, "/code")

import prepare_data  # noqa: E402
import tensorflow as tf  # noqa: E402
from model_check import hwc  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("test_file")
    p.add_argument("dest")
    p.add_argument("--count", type=int, default=4)
    args = p.parse_args()
    dest = Path(args.dest)
    written = []
    for i, (label, pixels) in enumerate(prepare_data.read_batch(args.test_file)):
        if i == args.count:
            break
        image, name = hwc(pixels), "%d-%s" % (i, prepare_data.LABELS[label])
        (dest / (name + ".png")).write_bytes(tf.io.encode_png(image).numpy())
        (dest / (name + ".jpg")).write_bytes(tf.io.encode_jpeg(image, quality=95).numpy())
        written.append({"label": prepare_data.LABELS[label], "png": name + ".png", "jpeg": name + ".jpg"})
    print(json.dumps(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
