"""`data=folder data.path=DIR`: one subfolder per class of PNG/JPEG/BMP/GIF images.

DIR/train/<class>/... and DIR/val/<class>/... when DIR has a `train/` folder (`val/`,
`validation/` or `test/` for the held-out split), otherwise DIR/<class>/... split once with
data.seed. Only file names are read here (plus one image, for the input shape when
data.image_size is null); images are decoded in parallel as batches are drawn. A file that cannot
be decoded is skipped with a warning naming it, so one bad file does not stop a long run.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from qat.config import DataConfig
from qat.data import Data
from qat.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
VAL_NAMES = ("val", "validation", "test")
PROBED_FILES = 16  # files tried for the first readable image
log = logging.getLogger("qat")


def _classes(directory: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(directory)
                  if entry.is_dir() and not entry.name.startswith("."))


def _files(directory: str, classes: list[str]) -> tuple[list[str], np.ndarray]:
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(directory, name)
        if not os.path.isdir(class_dir):
            continue
        for root, _, files in sorted(os.walk(class_dir)):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(root, file))
                    labels.append(label)
    return paths, np.asarray(labels, np.int32)


def _layout(root: str, cfg: DataConfig) -> tuple[list[str], tuple, tuple]:
    """(class names, (train paths, labels), (val paths, labels))."""
    train_dir = os.path.join(root, "train")
    if os.path.isdir(train_dir):
        val_dir = next((os.path.join(root, n) for n in VAL_NAMES
                        if os.path.isdir(os.path.join(root, n))), None)
        if val_dir is None:
            raise DataError(f"{root} has train/ but no val/ (or validation/, test/): add the "
                            "held-out images there, or put the class folders in DIR directly")
        classes = _classes(train_dir)
        _check_classes(train_dir, classes)
        extra = sorted(set(_classes(val_dir)) - set(classes))
        if extra:
            raise DataError(f"{val_dir} has classes {extra[:3]} that train/ lacks: the two "
                            "splits need the same class folders")
        return classes, _files(train_dir, classes), _files(val_dir, classes)
    classes = _classes(root)
    _check_classes(root, classes)
    paths, labels = _files(root, classes)
    if not paths:
        raise DataError(f"{root} has class folders but no {'/'.join(IMAGE_EXTENSIONS)} "
                        "images in them")
    order = np.random.default_rng(cfg.seed).permutation(len(paths))
    n_val = max(1, int(round(len(paths) * cfg.val_fraction)))
    train, val = order[n_val:], order[:n_val]
    return (classes, ([paths[i] for i in train], labels[train]),
            ([paths[i] for i in val], labels[val]))


def _check_classes(directory: str, classes: list[str]) -> None:
    if not classes:
        raise DataError(f"{directory} has no class folders: put each class's images in "
                        "DIR/<class name>/")
    if len(classes) < 2:
        raise DataError(f"{directory} has one class folder ({classes[0]}): a classifier needs "
                        "at least two")


def _decoder(size: tuple[int, int], channels: int):
    import tensorflow as tf

    def decode(path, label):
        image = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                                   expand_animations=False)
        image = tf.image.resize(tf.cast(image, tf.float32) / 255.0, size)
        return tf.ensure_shape(image, (*size, channels)), label

    return decode


def _first_image_shape(paths: list[str], channels: int | None) -> tuple[int, int, int]:
    import tensorflow as tf

    for path in paths[:PROBED_FILES]:
        try:
            image = tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
            continue
        height, width, own = image.shape
        return height, width, channels or (1 if own == 1 else 3)
    raise DataError(f"none of the first {min(len(paths), PROBED_FILES)} images could be "
                    f"decoded (e.g. {paths[0]}): check the files are PNG/JPEG/BMP/GIF")


def load_folder(cfg: DataConfig) -> Data:
    """List and check the folder; decoding happens in the input pipeline."""
    import tensorflow as tf

    root = os.path.abspath(os.path.expanduser(str(cfg.path)))
    if not os.path.isdir(root):
        raise DataError(f"data.path={root} is not a directory: point it at a folder with one "
                        "subfolder of images per class")
    classes, (train_paths, train_labels), (val_paths, val_labels) = _layout(root, cfg)
    for split, paths in (("training", train_paths), ("validation", val_paths)):
        if not paths:
            raise DataError(f"{root}: the {split} split has no images")
    # Listed class by class: permute once (seeded) so that even a bounded shuffle buffer, or
    # a cached stream, mixes classes; the pipeline reshuffles every epoch on top.
    order = np.random.default_rng(cfg.seed + 1).permutation(len(train_paths))
    train_paths, train_labels = [train_paths[i] for i in order], train_labels[order]
    height, width, channels = _first_image_shape(train_paths, cfg.channels)
    size = cfg.size or (height, width)
    if cfg.size is None:
        log.info("data=folder: images are resized to %dx%d (the first image's size); set "
                 "data.image_size to choose", *size)
    return Data(train=tf.data.Dataset.from_tensor_slices((train_paths, train_labels)),
                val=tf.data.Dataset.from_tensor_slices((val_paths, val_labels)),
                input_shape=(*size, channels), num_classes=len(classes),
                train_examples=len(train_paths), val_examples=len(val_paths),
                decode=_decoder(size, channels), class_names=tuple(classes))
