"""Datasets: the embedded digits split, npz layouts and their errors, synthetic data."""

import re

import numpy as np
import pytest

from qat.config import DataConfig
from qat.data import Data, batches, load_arrays
from qat.errors import DataError


def test_digits_is_deterministic_and_resized():
    a, b = load_arrays(DataConfig(image_size=12)), load_arrays(DataConfig(image_size=12))
    assert a.x_train.shape[1:] == (12, 12, 1) and a.num_classes == 10
    assert len(a.x_train) + len(a.x_val) == 1797
    np.testing.assert_array_equal(a.y_val, b.y_val)
    assert a.x_train.min() >= 0.0 and a.x_train.max() <= 1.0


def _npz(tmp_path, **arrays):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return str(path)


def _mnist_like(n=20, hw=10, channels=None, dtype=np.uint8):
    rng = np.random.default_rng(0)
    shape = (n, hw, hw) if channels is None else (n, hw, hw, channels)
    x = (rng.integers(0, 256, size=shape)).astype(dtype)
    return {"x_train": x, "y_train": rng.integers(0, 3, n), "x_test": x[:5],
            "y_test": rng.integers(0, 3, 5)}


@pytest.mark.parametrize("channels, dtype", [(None, np.uint8), (3, np.float32)])
def test_npz_layouts(tmp_path, channels, dtype):
    arrays = _mnist_like(channels=channels, dtype=dtype)
    if dtype == np.float32:
        arrays["x_train"] = arrays["x_train"] / 255.0
        arrays["x_test"] = arrays["x_test"] / 255.0
    data = load_arrays(DataConfig(name="npz", path=_npz(tmp_path, **arrays), image_size=10))
    assert data.x_train.shape == (20, 10, 10, channels or 1)
    assert data.x_train.dtype == np.float32 and data.x_train.max() <= 1.0
    assert data.num_classes == 3


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("y_test"), "lacks"),
    (lambda a: a.update(y_train=-np.ones(20, int)), "out of range"),
    (lambda a: a.update(x_test=np.zeros((5, 7, 7), np.uint8)), "must share one"),
    (lambda a: a.update(y_train=np.zeros(3, int)), "labels for"),
])
def test_npz_errors(tmp_path, change, message):
    arrays = _mnist_like()
    change(arrays)
    with pytest.raises(DataError, match=message):
        load_arrays(DataConfig(name="npz", path=_npz(tmp_path, **arrays)))


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_arrays(DataConfig(name="npz", path=str(tmp_path / "nope.npz")))


def test_synthetic_shapes_and_pipeline():
    data = load_arrays(DataConfig(name="synthetic", image_size=8, channels=3, num_classes=4,
                                  train_examples=64, val_examples=16))
    assert data.input_shape == (8, 8, 3) and data.num_classes == 4
    drawn = list(batches(Data.from_arrays(data).train, 16, shuffle=True, seed=0))
    assert len(drawn) == 4 and drawn[0][0].shape == (16, 8, 8, 3)


def test_npz_images_keep_their_own_size_unless_asked(tmp_path):
    path = _npz(tmp_path, **_mnist_like(hw=10))
    assert load_arrays(DataConfig(name="npz", path=path)).input_shape == (10, 10, 1)
    data = load_arrays(DataConfig(name="npz", path=path, image_size=[6, 12], channels=3))
    assert data.input_shape == (6, 12, 3)
    np.testing.assert_array_equal(data.x_val[..., 0], data.x_val[..., 2])  # gray → RGB


# -- data=folder ------------------------------------------------------------------------------
def _folder(tmp_path, **kwargs):
    from qat.data import load_data

    return load_data(DataConfig(name="folder", path=str(tmp_path / "images"), **kwargs))


def test_folder_streams_the_files_it_lists(tmp_path):
    from tests.conftest import write_image_folder

    written = write_image_folder(tmp_path / "images", per_class=6)
    data = _folder(tmp_path, channels=3)
    assert data.class_names == tuple(f"digit_{d}" for d in range(10))
    assert data.input_shape == (8, 8, 3) and data.num_classes == 10
    assert data.train_examples + data.val_examples == len(written) == 60
    assert data.val_examples == 12  # data.val_fraction of the files, split with data.seed
    # Decoded lazily, values exact (PNG is lossless): image = file pixels / 255, gray → RGB.
    paths = [p.decode() for p, _ in data.val.as_numpy_iterator()]
    images = np.concatenate([x for x, _ in data.val_batches(5)])
    for path, image in zip(paths, images, strict=True):
        np.testing.assert_allclose(image[..., 1], written[path] / 255.0, atol=1e-6)
    labels = np.concatenate([y for _, y in data.val_batches(5)])
    assert all(f"digit_{label}" in path for path, label in zip(paths, labels, strict=True))
    # max_examples caps evaluation; the training stream keeps full batches.
    assert sum(len(y) for _, y in data.val_batches(5, max_examples=7)) == 7


def test_folder_with_train_and_val_folders_and_a_resize(tmp_path):
    from tests.conftest import write_image_folder

    write_image_folder(tmp_path / "images", per_class=5, layout="split")
    data = _folder(tmp_path, image_size=[12, 10], channels=1)
    assert data.input_shape == (12, 10, 1)
    assert (data.train_examples, data.val_examples) == (40, 10)  # every 5th file is in val/
    x, _ = next(iter(data.val_batches(4)))
    assert x.shape == (4, 12, 10, 1)


def test_folder_skips_an_unreadable_file(tmp_path):
    from qat.data import batches
    from tests.conftest import write_image_folder

    written = write_image_folder(tmp_path / "images", per_class=3)
    broken = sorted(written)[-1]
    with open(broken, "wb") as fh:
        fh.write(b"not a png")
    data = _folder(tmp_path, val_fraction=0.1)
    seen = sum(len(y) for ds in (data.train, data.val)
               for _, y in batches(ds, 4, decode=data.decode).as_numpy_iterator())
    assert seen == len(written) - 1


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "is not a directory"),
    (lambda root: root.mkdir(), "has no class folders"),
    (lambda root: (root / "cats").mkdir(parents=True), "has one class folder (cats)"),
    (lambda root: [(root / c).mkdir(parents=True) for c in ("a", "b")], "no .png"),
    (lambda root: [(root / c / "x.png").parent.mkdir(parents=True) or
                   (root / c / "x.png").write_bytes(b"junk") for c in ("a", "b")],
     "could be decoded"),
    (lambda root: (root / "train" / "a").mkdir(parents=True), "no val/"),
])
def test_folder_errors(tmp_path, make, message):
    make(tmp_path / "images")
    with pytest.raises(DataError, match=re.escape(message)):
        _folder(tmp_path)


def test_augmentation_only_in_training_and_keeps_the_shape(tmp_path):
    from qat.config import AugmentConfig
    from qat.data import Data, batches

    arrays = load_arrays(DataConfig(image_size=12))
    data = Data.from_arrays(arrays)
    augment = AugmentConfig(flip=True, crop_padding=2, brightness=0.1, crop_scale_min=0.5)
    x, y = next(iter(batches(data.train, 64, shuffle=False, augment=augment)))
    assert x.shape == (64, 12, 12, 1) and float(np.min(x)) >= 0.0 and float(np.max(x)) <= 1.0
    assert np.abs(x.numpy() - arrays.x_train[:64]).max() > 0.1  # changed
    np.testing.assert_array_equal(y.numpy(), arrays.y_train[:64])
    flip_only = AugmentConfig(flip=True)
    x, _ = next(iter(batches(data.train, 256, augment=flip_only)))
    same = [np.array_equal(a, b) for a, b in zip(x.numpy(), arrays.x_train[:256], strict=True)]
    mirrored = [np.array_equal(a, b[:, ::-1]) for a, b in zip(x.numpy(), arrays.x_train[:256],
                                                              strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 0.3 < np.mean(mirrored) < 0.7
    val = np.concatenate([v for v, _ in data.val_batches(128)])  # evaluation: never augmented
    np.testing.assert_array_equal(val, arrays.x_val)


def test_normalization_after_augmentation_in_every_stream():
    """data.normalize maps [0, 1] pixels to the model's input after augmentation (which works on
    pixels), for training batches, evaluation batches and PTQ calibration samples alike."""
    from qat.config import AugmentConfig
    from qat.data import load_data

    pixels = load_arrays(DataConfig(image_size=12))
    data = load_data(DataConfig(image_size=12, normalize="symmetric"))
    val = np.concatenate([v for v, _ in data.val_batches(128)])
    np.testing.assert_allclose(val, pixels.x_val * 255 / 128 - 1, atol=1e-6)  # (p - 128)/128
    brighter = AugmentConfig(brightness=0.5)  # clips at the pixels' [0, 1], before normalizing
    x, _ = next(iter(batches(data.train, 256, shuffle=True, augment=brighter,
                             normalization=data.normalization)))
    assert -1.0 - 1e-6 <= float(np.min(x)) < -0.99 and float(np.max(x)) <= 127 / 128 + 1e-6
    assert float(np.min(data.sample_train(16, seed=0))) < -0.99

    cfg = {"image_size": 12, "channels": 3}
    mean, std = np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.25, 2.0])
    rgb = load_data(DataConfig(**cfg, normalize="mean_std", mean=list(mean), std=list(std)))
    got = np.concatenate([v for v, _ in rgb.val_batches(128)])
    want = (load_arrays(DataConfig(**cfg)).x_val - mean) / std
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert rgb.describe()["model_input"]["pixel_scale"] == pytest.approx(list(1 / std))
    with pytest.raises(DataError, match="3 values but the images have 1 channels"):
        load_data(DataConfig(image_size=12, normalize="mean_std", mean=[0.1, 0.2, 0.3],
                             std=[1.0, 1.0, 1.0]))


# -- data=tfds --------------------------------------------------------------------------------
def test_tfds_dataset_prepared_offline_streams_with_its_splits(tmp_path):
    from qat.data import load_data
    from tests.conftest import write_tfds_dataset

    name = write_tfds_dataset(tmp_path / "tfds")
    data = load_data(DataConfig(name="tfds", tfds_name=name, data_dir=str(tmp_path / "tfds"),
                                image_size=16, channels=3))
    assert (data.train_examples, data.val_examples) == (1500, 297)  # train / test splits
    assert data.input_shape == (16, 16, 3) and data.num_classes == 10
    x, y = next(iter(data.val_batches(32)))
    assert x.shape == (32, 16, 16, 3) and x.min() >= 0.0 and x.max() <= 1.0
    np.testing.assert_array_equal(x[..., 0], x[..., 2])  # gray → RGB
    assert y.dtype == np.int32 and set(np.unique(y)) <= set(range(10))


@pytest.mark.parametrize("name, message", [("mnist", "is not prepared in"),
                                           ("no_such_dataset_xyz", "is not in")])
def test_tfds_not_prepared_offline_is_one_line(tmp_path, name, message):
    from qat.data import load_data

    with pytest.raises(DataError, match=message) as info:
        load_data(DataConfig(name="tfds", tfds_name=name, data_dir=str(tmp_path)))
    assert "\n" not in str(info.value) and "data.data_dir" in str(info.value)
