"""The CIFAR-10 network and its inference class (TensorFlow 2 / Keras 3; standard library + TF only).

* :func:`build_network`: the classic CIFAR-10 CNN of the TensorFlow tutorial (conv 5x5x64,
  max-pool 3x3/2, local response normalisation, conv 5x5x64, LRN, max-pool, dense 384, dense
  192, linear 10; L2 weight decay 0.004 on the dense layers) on 24x24x3 inputs;
* :func:`eval_crop`, :func:`eval_image`: what an image goes through before the network at
  evaluation and inference: a central 24x24 crop (after resizing to 32x32 when it is another
  size) and per-image standardisation;
* :class:`Cifar10Classifier`: the platform's model contract for the inference tier:
  ``load_model(self)`` once, then ``execute(self, data, batch_size) -> list`` of labels, where
  ``data`` is a list of file-like request bodies (raw JPEG, PNG, GIF or BMP bytes).

``train.py`` imports this module for the network, so the model a job trains and the model the
inference tier loads are built from one definition.
"""
from __future__ import annotations

import os
from pathlib import Path

import keras
import tensorflow as tf

LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SIZE = 32          #: CIFAR-10 images are 32x32x3
CROP_SIZE = 24           #: the network sees 24x24 crops (random in training, central otherwise)
MODEL_FILE = "model.keras"


@keras.saving.register_keras_serializable(package="aiportal_cifar10")
class LocalResponseNormalization(keras.layers.Layer):
    """``tf.nn.local_response_normalization`` as a layer (Keras has none), with the tutorial's
    parameters; serialisable, so a saved model loads wherever this module is imported."""

    def __init__(self, depth_radius: int = 4, bias: float = 1.0, alpha: float = 0.001 / 9.0,
                 beta: float = 0.75, **kwargs):
        super().__init__(**kwargs)
        self.depth_radius, self.bias, self.alpha, self.beta = depth_radius, bias, alpha, beta

    def call(self, inputs):
        return tf.nn.local_response_normalization(inputs, depth_radius=self.depth_radius, bias=self.bias,
                                                  alpha=self.alpha, beta=self.beta)

    def get_config(self):
        return {**super().get_config(), "depth_radius": self.depth_radius, "bias": self.bias,
                "alpha": self.alpha, "beta": self.beta}


def build_network(num_classes: int = len(LABELS), weight_decay: float = 0.004) -> keras.Model:
    """The tutorial's CNN; outputs logits. ``weight_decay`` multiplies ``tf.nn.l2_loss`` of the
    dense layers' weights as in the tutorial (Keras' L2 has no 1/2, hence the halving)."""
    l2 = keras.regularizers.L2(weight_decay / 2)
    trunc = keras.initializers.TruncatedNormal
    inputs = keras.Input((CROP_SIZE, CROP_SIZE, 3), name="image")
    x = keras.layers.Conv2D(64, 5, padding="same", activation="relu", name="conv1",
                            kernel_initializer=trunc(stddev=5e-2))(inputs)
    x = keras.layers.MaxPooling2D(3, 2, padding="same", name="pool1")(x)
    x = LocalResponseNormalization(name="norm1")(x)
    x = keras.layers.Conv2D(64, 5, padding="same", activation="relu", name="conv2",
                            kernel_initializer=trunc(stddev=5e-2),
                            bias_initializer=keras.initializers.Constant(0.1))(x)
    x = LocalResponseNormalization(name="norm2")(x)
    x = keras.layers.MaxPooling2D(3, 2, padding="same", name="pool2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(384, activation="relu", name="local3", kernel_initializer=trunc(stddev=0.04),
                           bias_initializer=keras.initializers.Constant(0.1), kernel_regularizer=l2)(x)
    x = keras.layers.Dense(192, activation="relu", name="local4", kernel_initializer=trunc(stddev=0.04),
                           bias_initializer=keras.initializers.Constant(0.1), kernel_regularizer=l2)(x)
    logits = keras.layers.Dense(num_classes, name="softmax_linear",
                                kernel_initializer=trunc(stddev=1 / 192.0))(x)
    return keras.Model(inputs, logits, name="cifar10")


def eval_crop(image: tf.Tensor) -> tf.Tensor:
    """A 32x32x3 image (uint8 or float 0-255) -> the standardised central 24x24x3 crop
    (float32) the network takes at evaluation and inference."""
    image = tf.image.resize_with_crop_or_pad(tf.cast(image, tf.float32), CROP_SIZE, CROP_SIZE)
    return tf.image.per_image_standardization(image)


def eval_image(image: tf.Tensor) -> tf.Tensor:
    """Any HxWx3 image -> :func:`eval_crop` of it, resized to 32x32 first when it is another size."""
    shape = tf.shape(image)
    image = tf.cast(image, tf.float32)
    image = tf.cond(tf.logical_and(tf.equal(shape[0], IMAGE_SIZE), tf.equal(shape[1], IMAGE_SIZE)),
                    lambda: image, lambda: tf.image.resize(image, (IMAGE_SIZE, IMAGE_SIZE), antialias=True))
    return eval_crop(tf.ensure_shape(image, (IMAGE_SIZE, IMAGE_SIZE, 3)))


def find_model_file(model_dir: str | os.PathLike) -> Path:
    """``model.keras`` in ``model_dir`` or in its ``model/`` folder (a training job's whole
    output folder works as well as its ``model/``)."""
    root = Path(model_dir)
    for candidate in (root / MODEL_FILE, root / "model" / MODEL_FILE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("no %s in %s or %s/model; point model_dir at the output of a finished "
                            "training job" % (MODEL_FILE, root, root))


class Cifar10Classifier:
    """The trained CIFAR-10 model behind the platform's model contract.

    ``model_dir`` holds ``model.keras`` (or ``model/model.keras``); by default the folder this
    file is in, so the class and the model can be deployed side by side. ``execute`` returns
    one label per item of ``data``, in order. An item that is not a decodable image raises
    ``ValueError`` naming its position (the serving runtime answers that request with an error).
    """

    labels = LABELS

    def __init__(self, model_dir: str | os.PathLike | None = None):
        self.model_dir = Path(model_dir) if model_dir is not None else Path(__file__).resolve().parent
        self.model: keras.Model | None = None
        self._predict = None

    def load_model(self) -> None:
        """Load the Keras model once and trace the prediction function (so the first request
        does not pay for it). Decoding, preprocessing and the network run as one graph per
        batch: decoding image by image in eager mode cost ~1.6 ms per image on 2 CPU cores,
        five times the network's share of a batch of 32 (bench/bench_cifar_serving.py)."""
        self.model = keras.models.load_model(find_model_file(self.model_dir), compile=False)
        model = self.model

        def prepare(raw):
            return eval_image(tf.io.decode_image(raw, channels=3, expand_animations=False))

        @tf.function(input_signature=[tf.TensorSpec((None,), tf.string)])
        def predict(raws):
            batch = tf.map_fn(prepare, raws, fn_output_signature=tf.TensorSpec((CROP_SIZE, CROP_SIZE, 3), tf.float32))
            return tf.argmax(model(batch, training=False), axis=-1)

        self._predict = predict
        self._predict(tf.constant([tf.io.encode_png(tf.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), tf.uint8)).numpy()]))

    def execute(self, data, batch_size: int) -> list:
        """Labels for ``data`` (file-like objects or bytes holding JPEG/PNG/GIF/BMP images),
        run through the network ``batch_size`` images at a time."""
        if self._predict is None:
            raise RuntimeError("call load_model() before execute()")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1, got %r" % (batch_size,))
        raws = [self._read(i, item) for i, item in enumerate(data)]
        out: list[str] = []
        for start in range(0, len(raws), batch_size):
            chunk = raws[start:start + batch_size]
            try:
                classes = self._predict(tf.constant(chunk)).numpy()
            except tf.errors.OpError:
                # one item is not an image: decode them one by one to say which (ValueError)
                for i, raw in enumerate(chunk):
                    self._decode(start + i, raw)
                raise
            out += [LABELS[int(c)] for c in classes]
        return out

    @staticmethod
    def _read(index: int, item) -> bytes:
        raw = item.read() if hasattr(item, "read") else item
        if not isinstance(raw, (bytes, bytearray, memoryview)) or not raw:
            raise ValueError("item %d: expected the bytes of a JPEG or PNG image, got %s"
                             % (index, "nothing" if not raw else type(raw).__name__))
        return bytes(raw)

    @classmethod
    def _decode(cls, index: int, item) -> tf.Tensor:
        """One item, decoded and preprocessed eagerly; ``ValueError`` naming ``index`` when it
        is not an image."""
        raw = cls._read(index, item)
        try:
            image = tf.io.decode_image(bytes(raw), channels=3, expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
            raise ValueError("item %d is not a JPEG, PNG, GIF or BMP image (%d bytes): %s"
                             % (index, len(raw), e.message.splitlines()[0] if e.message else e)) from None
        return eval_image(image)
