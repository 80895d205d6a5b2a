"""Shared fixtures: tiny in-memory data, configs and a subprocess runner for the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import qat  # noqa: F401  (selects tf_keras before TensorFlow is imported anywhere)

REPO = Path(__file__).resolve().parents[1]


def conv_bn_relu6_net():
    """conv → qat BN → ReLU6 → flatten → dense on 4×4×2 inputs: the smallest net with a ReLU6
    that TFLite fuses into the op before it (flattened, not pooled, so every clamped value
    reaches the logits on its own)."""
    import tf_keras

    from qat.layers import QuantBatchNorm

    inputs = tf_keras.Input((4, 4, 2))
    y = tf_keras.layers.Conv2D(4, 1, name="conv")(inputs)
    y = QuantBatchNorm(name="bn")(y)
    y = tf_keras.layers.ReLU(6.0, name="relu6")(y)
    y = tf_keras.layers.Flatten(name="flat")(y)
    return tf_keras.Model(inputs, tf_keras.layers.Dense(3, name="logits")(y))


def fine_tuned(build, arrays, float_epochs: int, cfg=None):
    """A Keras model from `build(input_shape, classes)`, trained in float on the digits, then
    prepared, quantized (`cfg`: a QuantConfig, default QuantConfig()) and fine-tuned one epoch:
    (prepared float model, QAT model)."""
    import tf_keras

    from qat.api import prepare
    from qat.config import QuantConfig
    from qat.quantize import quantize_model

    tf_keras.utils.set_random_seed(0)
    keras_model = build(arrays.input_shape, arrays.num_classes)
    loss = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    keras_model.compile(tf_keras.optimizers.Adam(3e-3), loss)
    keras_model.fit(arrays.x_train, arrays.y_train, batch_size=64, epochs=float_epochs,
                    verbose=0)
    model = prepare(keras_model)
    qmodel = quantize_model(model, cfg or QuantConfig())
    qmodel.compile(tf_keras.optimizers.Adam(1e-4), loss)
    qmodel.fit(arrays.x_train, arrays.y_train, batch_size=64, epochs=1, verbose=0)
    return model, qmodel


def run_cli(*args: str, timeout: int = 600,
            extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m ...` from the repository like a user would; returns the finished process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2", **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_image_folder(root, per_class: int | None = None, layout: str = "flat",
                       size: int = 8) -> dict:
    """The embedded digits written as PNG files in class folders (what `data=folder` reads):
    layout "flat" (root/<digit>/) or "split" (root/train/<digit>/, root/val/<digit>/).
    Returns {path: pixels (H×W uint8)} of every file written."""
    import numpy as np
    import tensorflow as tf
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * 255.0 / 16.0).astype(np.uint8)
    if size != 8:
        images = tf.image.resize(images[..., None], (size, size), "nearest").numpy()[..., 0]
    written, counts = {}, {}
    for index, (image, label) in enumerate(zip(images, bunch.target, strict=True)):
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        split = "" if layout == "flat" else ("val" if index % 5 == 0 else "train")
        directory = root / split / f"digit_{label}"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{index:04d}.png"
        path.write_bytes(tf.io.encode_png(image[..., None]).numpy())
        written[str(path)] = image
    return written


def write_tfds_dataset(data_dir, name: str = "qat_tiny_digits") -> str:
    """A tiny tensorflow-datasets dataset (the embedded digits, train + test splits) prepared
    in `data_dir`, as `tfds build` would leave it; qat then reads it from its files alone."""
    import numpy as np
    import tensorflow_datasets as tfds
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * 255.0 / 16.0).astype(np.uint8)[..., None]

    if name in _TFDS_BUILDERS:  # tfds registers a builder class once per process, by name
        _TFDS_BUILDERS[name](data_dir=str(data_dir)).download_and_prepare()
        return name

    class Builder(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, supervised_keys=("image", "label"),
                                         features=tfds.features.FeaturesDict({
                                             "image": tfds.features.Image(shape=(8, 8, 1)),
                                             "label": tfds.features.ClassLabel(num_classes=10)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(range(0, 1500)),
                    "test": self._generate_examples(range(1500, 1797))}

        def _generate_examples(self, indices):
            for i in indices:
                yield i, {"image": images[i], "label": int(bunch.target[i])}

    Builder.name = name
    _TFDS_BUILDERS[name] = Builder
    Builder(data_dir=str(data_dir)).download_and_prepare()
    return name


_TFDS_BUILDERS: dict = {}
