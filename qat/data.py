"""Datasets as tf.data pipelines: digits (embedded default), npz, synthetic, and tfds names.

Every source is reduced to the same in-memory arrays (`Arrays`: float32 NHWC images in [0, 1],
int32 labels) before batching, so the training code never cares where data came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from qat.config import DataConfig
from qat.errors import DataError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
SHUFFLE_BUFFER = 10_000


@dataclass(frozen=True)
class Arrays:
    """A train/validation split held in memory: images float32 NHWC in [0, 1], labels int32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def load_arrays(cfg: DataConfig) -> Arrays:
    """Load the configured dataset into memory, validated and normalized."""
    loaders = {"digits": _load_digits, "npz": _load_npz, "synthetic": _load_synthetic}
    loader = loaders.get(cfg.name, _load_tfds)
    return loader(cfg)


def make_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, *, shuffle: bool, seed: int,
                 repeat: bool = False):
    """Batched, prefetched tf.data pipeline; shuffling is seeded and reshuffled each epoch."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(min(len(x), SHUFFLE_BUFFER), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    return ds.batch(batch_size, drop_remainder=shuffle).prefetch(tf.data.AUTOTUNE)


def _split(x: np.ndarray, y: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, ...]:
    """Deterministic stratified-free split: one seeded permutation, the tail is validation."""
    order = np.random.default_rng(cfg.seed).permutation(len(x))
    n_val = max(1, int(round(len(x) * cfg.val_fraction)))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of NHWC float images (TensorFlow's kernel, run eagerly once)."""
    if x.shape[1] == size and x.shape[2] == size:
        return x
    import tensorflow as tf

    return tf.image.resize(x, (size, size), method="bilinear").numpy().astype(np.float32)


def _load_digits(cfg: DataConfig) -> Arrays:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[..., None]  # pixel values are 0..16
    y = bunch.target.astype(np.int32)
    x_tr, y_tr, x_va, y_va = _split(_resize(x, cfg.image_size), y, cfg)
    return Arrays(x_tr, y_tr, x_va, y_va, num_classes=10)


def _load_synthetic(cfg: DataConfig) -> Arrays:
    """Class-dependent mean patterns plus noise: learnable, so accuracy moves during tests."""
    rng = np.random.default_rng(cfg.seed)
    shape = (cfg.image_size, cfg.image_size, cfg.channels)
    prototypes = rng.uniform(0.0, 1.0, size=(cfg.num_classes, *shape)).astype(np.float32)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, cfg.num_classes, size=n).astype(np.int32)
        noise = rng.normal(0.0, 0.35, size=(n, *shape)).astype(np.float32)
        return np.clip(prototypes[y] + noise, 0.0, 1.0), y

    x_tr, y_tr = draw(cfg.train_examples)
    x_va, y_va = draw(cfg.val_examples)
    return Arrays(x_tr, y_tr, x_va, y_va, num_classes=cfg.num_classes)


def _load_npz(cfg: DataConfig) -> Arrays:
    path = os.path.abspath(os.path.expanduser(str(cfg.path)))
    if not os.path.isfile(path):
        raise DataError(f"data.path={path} does not exist: point data.path at a .npz file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise DataError(f"{path} lacks {missing}: the .npz needs keys {list(NPZ_KEYS)}")
            arrays = {k: npz[k] for k in NPZ_KEYS}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path} is not a readable .npz ({type(exc).__name__}): re-create it "
                        "with numpy.savez") from exc
    x_tr = _images(arrays["x_train"], "x_train", path)
    x_te = _images(arrays["x_test"], "x_test", path)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{path}: x_train images are {x_tr.shape[1:]} but x_test images are "
                        f"{x_te.shape[1:]}: all images must share one H×W×C")
    y_tr = _labels(arrays["y_train"], len(x_tr), "train", path)
    y_te = _labels(arrays["y_test"], len(x_te), "test", path)
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    return Arrays(_resize(x_tr, cfg.image_size), y_tr, _resize(x_te, cfg.image_size), y_te,
                  num_classes=num_classes)


def _images(x: np.ndarray, key: str, path: str) -> np.ndarray:
    """N×H×W or N×H×W×C, uint8 (0..255) or float (already scaled) → float32 NHWC in [0, 1]."""
    if x.dtype == object or x.ndim not in (3, 4) or len(x) == 0:
        raise DataError(f"{path}: {key} has shape {x.shape} ({x.dtype}): images must be a "
                        "non-empty N×H×W or N×H×W×C array of one shape")
    if x.ndim == 3:
        x = x[..., None]
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{path}: {key} contains NaN or Inf: clean the images first")
    return x / 255.0 if x.max() > 1.0 else x


def _labels(y: np.ndarray, n: int, split: str, path: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if len(y) != n:
        raise DataError(f"{path}: y_{split} has {len(y)} labels for {n} images: they must match")
    if not np.issubdtype(y.dtype, np.integer) and (
            not np.all(np.isfinite(y)) or np.any(y != np.round(y))):
        raise DataError(f"{path}: y_{split} holds non-integer labels: use class ids 0..K-1")
    if y.min() < 0:
        raise DataError(f"{path}: y_{split} has label {int(y.min())} out of range: use class "
                        "ids 0..K-1")
    return y.astype(np.int32)


def _load_tfds(cfg: DataConfig) -> Arrays:
    """mnist / fashion_mnist / cifar10 from keras' cache or download; offline → clear error."""
    from tf_keras import datasets as keras_datasets

    module = getattr(keras_datasets, cfg.name)
    try:
        (x_tr, y_tr), (x_te, y_te) = module.load_data()
    except Exception as exc:
        raise DataError(f"data={cfg.name} needs the network or a cached copy and neither is "
                        f"available ({type(exc).__name__}): save the arrays to a .npz and use "
                        "data=npz data.path=FILE") from exc
    x_tr = _images(np.asarray(x_tr), "x_train", cfg.name)
    x_te = _images(np.asarray(x_te), "x_test", cfg.name)
    return Arrays(_resize(x_tr, cfg.image_size), _labels(y_tr, len(x_tr), "train", cfg.name),
                  _resize(x_te, cfg.image_size), _labels(y_te, len(x_te), "test", cfg.name),
                  num_classes=10)
