"""Model sources: keras.applications, a user's builder, a saved file; each with qat's BN."""

import numpy as np
import pytest
import tf_keras
from tf_keras import layers

from qat.config import ModelConfig
from qat.errors import ConfigError
from qat.layers import QuantBatchNorm
from qat.sources import load_float_model

SHAPE, CLASSES = (32, 32, 3), 10


def keras_bn_classifier(input_shape=SHAPE, num_classes=CLASSES, width=4):
    """A user's model: plain Keras BN, a softmax output (what `target` builders return)."""
    inputs = tf_keras.Input(input_shape)
    x = layers.Conv2D(width, 3, use_bias=False, name="conv")(inputs)
    x = layers.ReLU(name="relu")(layers.BatchNormalization(name="bn")(x))
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return tf_keras.Model(inputs, layers.Dense(num_classes, activation="softmax", name="out")(x))


def not_a_model(input_shape, num_classes):
    return "model"


def _qat_bns(model):
    return [layer for layer in model.layers if isinstance(layer, QuantBatchNorm)]


def test_keras_application_is_built_for_the_data_with_qat_batchnorm():
    model = load_float_model(ModelConfig(name="keras", arch="MobileNetV2",
                                         kwargs={"alpha": 0.35}), SHAPE, CLASSES)
    assert model.input_shape[1:] == SHAPE and model.output_shape[-1] == CLASSES
    assert len(_qat_bns(model)) == 52
    assert not any(isinstance(layer, layers.BatchNormalization) for layer in model.layers)
    assert model.layers[-1].get_config()["activation"] == "linear"  # logits


def test_unknown_arch_suggests_the_close_names():
    with pytest.raises(ConfigError, match="MobileNetV3 is not .*did you mean .*MobileNetV3Small"):
        load_float_model(ModelConfig(name="keras", arch="MobileNetV3"), SHAPE, CLASSES)


def test_target_builder_is_called_with_shape_classes_and_kwargs():
    model = load_float_model(ModelConfig(name="target",
                                         target="tests.test_sources:keras_bn_classifier",
                                         kwargs={"width": 6}), SHAPE, CLASSES)
    assert model.get_layer("conv").filters == 6 and len(_qat_bns(model)) == 1
    assert model.get_layer("out").get_config()["activation"] == "linear"


@pytest.mark.parametrize("target, message", [
    ("tests.test_sources:missing", "cannot be imported"),
    ("no_such_package.nets:build", "cannot be imported"),
    ("tests.test_sources:not_a_model", "returned str, not a tf_keras model"),
])
def test_bad_targets_fail_in_one_line(target, message):
    with pytest.raises(ConfigError, match=message):
        load_float_model(ModelConfig(name="target", target=target), SHAPE, CLASSES)


@pytest.mark.parametrize("suffix", [".keras", ".h5", "_savedmodel"])
def test_saved_file_loads_converted_with_logits(tmp_path, suffix):
    original = keras_bn_classifier()
    bn = original.get_layer("bn")
    rng = np.random.default_rng(0)
    bn.moving_mean.assign(rng.normal(0, 1, 4))
    bn.moving_variance.assign(rng.uniform(0.5, 2.0, 4))
    path = str(tmp_path / f"user{suffix}")
    original.save(path)
    model = load_float_model(ModelConfig(name="file", path=path), SHAPE, CLASSES)
    x = rng.normal(size=(8, *SHAPE)).astype(np.float32)
    probabilities = tf_keras.activations.softmax(model(x, training=False)).numpy()
    np.testing.assert_allclose(probabilities, original(x, training=False).numpy(), atol=1e-6)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_bytes(b"not a model"), "could not be loaded"),
])
def test_missing_or_corrupt_file_fails_in_one_line(tmp_path, make, message):
    path = tmp_path / "model.keras"
    make(path)
    with pytest.raises(ConfigError, match=message):
        load_float_model(ModelConfig(name="file", path=str(path)), SHAPE, CLASSES)


def test_a_model_that_does_not_fit_the_data_is_refused(tmp_path):
    path = str(tmp_path / "m.keras")
    keras_bn_classifier().save(path)
    with pytest.raises(ConfigError, match=r"shape \(32, 32, 3\), the data is \(16, 16, 1"):
        load_float_model(ModelConfig(name="file", path=path), (16, 16, 1), CLASSES)
    with pytest.raises(ConfigError, match="outputs 10 classes, the data has 3"):
        load_float_model(ModelConfig(name="file", path=path), SHAPE, 3)
