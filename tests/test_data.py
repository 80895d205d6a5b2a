"""Datasets: the embedded digits split, npz layouts and their errors, synthetic data."""

import numpy as np
import pytest

from qat.config import DataConfig
from qat.data import load_arrays, make_dataset
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
    batches = list(make_dataset(data.x_train, data.y_train, 16, shuffle=True, seed=0))
    assert len(batches) == 4 and batches[0][0].shape == (16, 8, 8, 3)
