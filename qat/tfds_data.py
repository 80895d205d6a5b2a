"""`data=tfds data.tfds_name=NAME [data.data_dir=DIR]`: a tensorflow-datasets dataset that is
already prepared on this machine (nothing is downloaded at run time).

Any prepared dataset with `supervised_keys` (image, label) works, registered or not (tfds reads
an unregistered one from its files in data_dir). Splits: `train`, and `validation` or `test`
for held-out data, else the last data.val_fraction of `train` (tfds split slicing). Streamed:
files shuffled, images decoded by tfds, then scaled to [0, 1], resized and given data.channels
in the input pipeline, as for every other source.
"""

from __future__ import annotations

import os

from qat.config import DataConfig
from qat.data import SHUFFLE_BUFFER, Data
from qat.errors import DataError

HELD_OUT = ("validation", "test")


def _builder(cfg: DataConfig):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError("data=tfds needs tensorflow-datasets: pip install "
                        "'qat[datasets]'") from None
    data_dir = os.path.expanduser(cfg.data_dir) if cfg.data_dir else None
    where = data_dir or "tfds' default data_dir (~/tensorflow_datasets)"
    hint = (f"prepare it where there is network (tfds build {cfg.tfds_name} --data_dir DIR) and "
            "point data.data_dir at DIR")
    try:
        builder = tfds.builder(cfg.tfds_name, data_dir=data_dir)
    except Exception as exc:  # DatasetNotFoundError, a bad name...
        raise DataError(f"tfds dataset {cfg.tfds_name} is not in {where} "
                        f"({type(exc).__name__}): {hint}") from None
    if not builder.info.splits or not sum(s.num_examples for s in builder.info.splits.values()):
        raise DataError(f"tfds dataset {cfg.tfds_name} is not prepared in {where}: {hint}")
    return builder


def load_tfds(cfg: DataConfig) -> Data:
    import tensorflow as tf

    builder = _builder(cfg)
    info = builder.info
    if not info.supervised_keys:
        raise DataError(f"tfds dataset {cfg.tfds_name} has no supervised_keys (image, label): "
                        "qat trains image classifiers")
    image_key, label_key = info.supervised_keys[:2]
    labels = info.features[label_key]
    splits = set(info.splits)
    if "train" not in splits:
        raise DataError(f"tfds dataset {cfg.tfds_name} has no train split (it has "
                        f"{sorted(splits)})")
    held_out = next((s for s in HELD_OUT if s in splits), None)
    train, val = "train", held_out
    if held_out is None:
        cut = 100 - int(round(cfg.val_fraction * 100))
        train, val = f"train[:{cut}%]", f"train[{cut}%:]"
    height, width, own = info.features[image_key].shape
    size = cfg.size or (height, width)
    if None in size:
        raise DataError(f"tfds dataset {cfg.tfds_name} has images of varying size: set "
                        "data.image_size")
    channels = cfg.channels or own or 3

    def decode(image, label):
        image = tf.cast(image, tf.float32) / 255.0
        if image.shape[-1] != channels:
            image = (tf.image.grayscale_to_rgb(image) if channels == 3 else
                     tf.image.rgb_to_grayscale(image))
        image = tf.image.resize(image, size)
        return tf.ensure_shape(image, (*size, channels)), tf.cast(label, tf.int32)

    def split(name, shuffle):
        return builder.as_dataset(split=name, as_supervised=True, shuffle_files=shuffle,
                                  read_config=_read_config(cfg.seed))

    train_count = info.splits[train].num_examples
    return Data(train=split(train, True), val=split(val, False),
                input_shape=(*size, channels), num_classes=labels.num_classes,
                train_examples=train_count, val_examples=info.splits[val].num_examples,
                decode=decode, class_names=tuple(getattr(labels, "names", None) or ()) or None,
                shuffle_buffer=min(train_count, SHUFFLE_BUFFER))


def _read_config(seed: int):
    import tensorflow_datasets as tfds

    return tfds.ReadConfig(shuffle_seed=seed)
