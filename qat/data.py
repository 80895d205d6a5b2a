"""Datasets as streaming tf.data pipelines: digits (embedded default), npz, folder, synthetic.

`load_data` gives every source the same shape, `Data`: unbatched streams of (float32 HWC image
in [0, 1], int32 label), plus what the models and the run dir need to know about it. `batches`
turns a stream into the training or evaluation pipeline (shuffle, augment, batch, prefetch).
The array sources (digits, npz, synthetic, keras datasets) are small and held in memory
(`Arrays`); a folder of images is listed, not loaded: images are decoded as batches are drawn.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np

from qat.config import AugmentConfig, DataConfig
from qat.errors import DataError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
SHUFFLE_BUFFER = 10_000
log = logging.getLogger("qat")


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


@dataclass(frozen=True)
class Data:
    """A dataset as streams. `train`/`val` yield items that `decode` (if any) maps to
    (image, label): file paths for a folder, so shuffling moves strings, not pixels."""

    train: object  # tf.data.Dataset
    val: object
    input_shape: tuple[int, ...]
    num_classes: int
    train_examples: int
    val_examples: int
    decode: Callable | None = None
    class_names: tuple[str, ...] | None = None
    shuffle_buffer: int | None = None  # items shuffled per epoch; None: all (file names)
    # data.normalize as (scale, offset): the model sees pixel·scale + offset; None: [0, 1]
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @property
    def train_buffer(self) -> int:
        """How many training items one shuffle holds."""
        return self.shuffle_buffer or self.train_examples

    @classmethod
    def from_arrays(cls, arrays: Arrays) -> Data:
        import tensorflow as tf

        return cls(tf.data.Dataset.from_tensor_slices((arrays.x_train, arrays.y_train)),
                   tf.data.Dataset.from_tensor_slices((arrays.x_val, arrays.y_val)),
                   arrays.input_shape, arrays.num_classes, len(arrays.x_train),
                   len(arrays.x_val))

    def describe(self) -> dict:
        """What a run records about its data (`<phase>/data.json`)."""
        scale, offset = self.normalization or ((1.0,), (0.0,))
        return {"input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "class_names": list(self.class_names) if self.class_names else None,
                "train_examples": self.train_examples, "val_examples": self.val_examples,
                "model_input": {"pixel_scale": list(scale), "pixel_offset": list(offset),
                                "note": "model input = pixel/255 * pixel_scale + pixel_offset"}}

    def val_batches(self, batch_size: int, max_examples: int | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The validation stream as numpy batches, in order, at most `max_examples` images."""
        ds = self.val if max_examples is None else self.val.take(max_examples)
        yield from batches(ds, batch_size, decode=self.decode,
                           normalization=self.normalization).as_numpy_iterator()

    def sample_train(self, count: int, seed: int) -> np.ndarray:
        """`count` training images drawn at random (PTQ calibration), without augmentation."""
        ds = self.train.shuffle(self.train_buffer, seed=seed)
        if self.decode is not None:
            ds = ds.map(self.decode).ignore_errors()
        x = np.concatenate([x[None] for x, _ in ds.take(count).as_numpy_iterator()])
        return normalized(x, self.normalization)


def load_arrays(cfg: DataConfig) -> Arrays:
    """Load an in-memory dataset, validated and normalized (not for data=folder)."""
    loaders = {"digits": _load_digits, "npz": _load_npz, "synthetic": _load_synthetic}
    loader = loaders.get(cfg.name, _load_tfds)
    arrays = loader(cfg)
    if cfg.channels is not None:
        arrays = replace(arrays, x_train=_to_channels(arrays.x_train, cfg.channels),
                         x_val=_to_channels(arrays.x_val, cfg.channels))
    return arrays


def load_data(cfg: DataConfig) -> Data:
    """The configured dataset as streams; a folder is listed and checked, never loaded."""
    if cfg.name == "folder":
        from qat.folder import load_folder

        data = load_folder(cfg)
    elif cfg.name == "tfds":
        from qat.tfds_data import load_tfds

        data = load_tfds(cfg)
    else:
        data = Data.from_arrays(load_arrays(cfg))
    return replace(data, normalization=_normalization(cfg, data.input_shape[-1]))


def _normalization(cfg: DataConfig, channels: int):
    """data.normalize as (scale, offset) tuples, checked against the images' channels."""
    if cfg.normalize == "unit":
        return None
    scale, offset = cfg.pixel_affine()
    if len(scale) not in (1, channels):
        raise DataError(f"data.mean/data.std have {len(scale)} values but the images have "
                        f"{channels} channels: give one value or {channels}")
    return tuple(scale), tuple(offset)


def normalized(x, normalization: tuple | None):
    """Images (NumPy or TensorFlow, [0, 1] pixels) as the model takes them: pixel·scale +
    offset per channel (`Data.normalization`; None: unchanged)."""
    if normalization is None:
        return x
    scale, offset = (np.asarray(v, np.float32) for v in normalization)
    return x * scale + offset


def batches(ds, batch_size: int, *, shuffle: bool = False, seed: int = 0, repeat: bool = False,
            decode: Callable | None = None, augment: AugmentConfig | None = None,
            cache: bool = False, buffer: int = SHUFFLE_BUFFER,
            normalization: tuple | None = None):
    """The pipeline: shuffle (reshuffled each epoch; file names, before decoding) → decode
    (→ cache) → augment → normalize → batch → prefetch. Training batches are full
    (drop_remainder); evaluation keeps the last one. Augmentation works on [0, 1] pixels;
    `normalization` (`Data.normalization`) maps them to the model's input after it."""
    import tensorflow as tf

    auto = tf.data.AUTOTUNE
    if shuffle and decode is not None:  # file names: a buffer over all of them is cheap
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    if cache and decode is not None:
        ds, decode = ds.map(decode, num_parallel_calls=auto).ignore_errors().cache(), None
    if shuffle and decode is None:  # decoded images: a bounded buffer
        ds = ds.shuffle(min(buffer, SHUFFLE_BUFFER), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if decode is not None:  # an unreadable file is skipped (tf.data logs it), not fatal
        ds = ds.map(decode, num_parallel_calls=auto, deterministic=True).ignore_errors(
            log_warning=True)
    if augment is not None and augment.active:
        from qat.augment import augmenter

        ds = ds.map(augmenter(augment, seed), num_parallel_calls=auto, deterministic=True)
    if normalization is not None:
        ds = ds.map(lambda x, y: (normalized(x, normalization), y), num_parallel_calls=auto,
                    deterministic=True)
    return ds.batch(batch_size, drop_remainder=shuffle).prefetch(auto)


def _to_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """Gray → RGB by repeating; RGB → gray by ITU-R 601 luma (tf.image's weights)."""
    if x.shape[-1] == channels:
        return x
    if channels == 3 and x.shape[-1] == 1:
        return np.repeat(x, 3, axis=-1)
    if channels == 1 and x.shape[-1] == 3:
        return (x @ np.array([0.2989, 0.5870, 0.1140], np.float32))[..., None]
    raise DataError(f"images have {x.shape[-1]} channels: data.channels={channels} cannot be "
                    "made from them (use 1 or 3 channel images)")


def _split(x: np.ndarray, y: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, ...]:
    """Deterministic stratified-free split: one seeded permutation, the tail is validation."""
    order = np.random.default_rng(cfg.seed).permutation(len(x))
    n_val = max(1, int(round(len(x) * cfg.val_fraction)))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def _resize(x: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Bilinear resize of NHWC float images (TensorFlow's kernel, run eagerly once); None or the
    images' own size: unchanged."""
    if size is None or tuple(x.shape[1:3]) == tuple(size):
        return x
    import tensorflow as tf

    return tf.image.resize(x, size, method="bilinear").numpy().astype(np.float32)


def _load_digits(cfg: DataConfig) -> Arrays:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[..., None]  # pixel values are 0..16
    y = bunch.target.astype(np.int32)
    x_tr, y_tr, x_va, y_va = _split(_resize(x, cfg.size), y, cfg)
    return Arrays(x_tr, y_tr, x_va, y_va, num_classes=10)


def _load_synthetic(cfg: DataConfig) -> Arrays:
    """Class-dependent mean patterns plus noise: learnable, so accuracy moves during tests."""
    rng = np.random.default_rng(cfg.seed)
    shape = (*cfg.size, cfg.channels or 1)
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
    return Arrays(_resize(x_tr, cfg.size), y_tr, _resize(x_te, cfg.size), y_te,
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
    if x.min() < 0.0:  # already normalized: qat normalizes after augmenting (data.normalize)
        raise DataError(f"{path}: {key} has negative pixel values (min {x.min():.3g}): store "
                        "uint8 pixels or floats in [0, 1], and set data.normalize "
                        "(symmetric, mean_std) for the model's input")
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
    return Arrays(_resize(x_tr, cfg.size), _labels(y_tr, len(x_tr), "train", cfg.name),
                  _resize(x_te, cfg.size), _labels(y_te, len(x_te), "test", cfg.name),
                  num_classes=10)
