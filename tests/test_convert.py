"""Keras BN → qat BN: same outputs, same training, nested and Sequential models, bad models."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from tf_keras import layers

from qat.config import QuantConfig
from qat.convert import convert_batchnorms
from qat.errors import ConfigError
from qat.fold import fold_batchnorms, parity
from qat.graph import consumers
from qat.layers import QuantBatchNorm, set_switches
from qat.quantize import quantize_model


def _randomize_batchnorms(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.submodules:
        if isinstance(layer, layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 1, c))
            layer.moving_variance.assign(rng.uniform(0.2, 3.0, c))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 2.0, c) * rng.choice([-1, 1], c))
            if layer.center:
                layer.beta.assign(rng.normal(0, 1, c))
    return model


def keras_functional():
    """Every BN flavour: after a conv with bias, center/scale off, frozen, N×C, a TFOpLambda."""
    inputs = tf_keras.Input((8, 8, 3), name="pixels")
    x = layers.Conv2D(6, 3, padding="same", name="conv")(inputs)
    x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="bn")(x)
    x = layers.Activation("relu", name="act")(x)
    x = tf.math.multiply(x, 0.5)  # a TFOpLambda with a constant argument
    x = layers.BatchNormalization(center=False, scale=False, name="bn_plain")(x)
    x = layers.BatchNormalization(name="bn_frozen", trainable=False)(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(5, name="fc")(x)
    x = layers.BatchNormalization(name="bn_vector")(x)
    return tf_keras.Model(inputs, x, name="user_model")


def nested():
    """A backbone model used as a layer inside a classifier (transfer-learning shape)."""
    backbone_in = tf_keras.Input((8, 8, 3))
    y = layers.Conv2D(4, 3, use_bias=False, name="bb_conv")(backbone_in)
    y = layers.BatchNormalization(name="bb_bn")(y)
    backbone = tf_keras.Model(backbone_in, layers.ReLU(name="bb_relu")(y), name="backbone")
    inputs = tf_keras.Input((8, 8, 3))
    x = layers.GlobalAveragePooling2D(name="gap")(backbone(inputs))
    return tf_keras.Model(inputs, layers.Dense(3, name="head")(x), name="classifier")


def sequential():
    return tf_keras.Sequential([
        tf_keras.Input((8, 8, 3)), layers.Conv2D(4, 3, use_bias=False, name="conv"),
        layers.BatchNormalization(name="bn"), layers.ReLU(name="relu"),
        layers.Flatten(name="flat"), layers.Dense(3, name="logits")], name="seq")


def _x(seed=1):
    return np.random.default_rng(seed).normal(0.5, 1.0, (16, 8, 8, 3)).astype(np.float32)


@pytest.mark.parametrize("builder", [keras_functional, nested, sequential])
def test_converted_model_computes_what_the_original_computes(builder):
    model = _randomize_batchnorms(builder())
    converted = convert_batchnorms(model)
    assert not any(isinstance(layer, layers.BatchNormalization) for layer in converted.layers)
    assert not any(isinstance(layer, tf_keras.Model) for layer in converted.layers)  # inlined
    x = _x()
    np.testing.assert_allclose(converted(x, training=False).numpy(),
                               model(x, training=False).numpy(), rtol=1e-5, atol=1e-5)
    bns = [layer for layer in converted.layers if isinstance(layer, QuantBatchNorm)]
    assert bns and all(int(bn.quant_switch.numpy()) == 0 for bn in bns)


def test_settings_and_frozen_batchnorms_are_carried_over():
    converted = convert_batchnorms(keras_functional())
    bn = converted.get_layer("bn")
    assert (bn.momentum, bn.epsilon) == (0.9, 1e-5)
    plain = converted.get_layer("bn_plain")
    assert not plain.center and not plain.scale and not plain.trainable_weights
    assert not converted.get_layer("bn_frozen").trainable


def test_training_continues_as_in_keras():
    """Same weights after a few fit steps: both ranks, the frozen BN kept in inference mode."""
    original = _randomize_batchnorms(keras_functional())
    converted = convert_batchnorms(original)
    x, y = _x(), np.random.default_rng(2).normal(size=(16, 5)).astype(np.float32)
    frozen_before = original.get_layer("bn_frozen").moving_mean.numpy().copy()
    for model in (original, converted):
        model.compile(tf_keras.optimizers.SGD(0.05), "mse")
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for name in ("bn", "bn_frozen", "bn_vector", "conv", "fc"):
        for a, b in zip(original.get_layer(name).weights, converted.get_layer(name).weights,
                        strict=False):
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5,
                                       err_msg=f"{name}: {a.name}")
    np.testing.assert_array_equal(converted.get_layer("bn_frozen").moving_mean.numpy(),
                                  frozen_before)


@pytest.mark.parametrize("builder", [keras_functional, nested, sequential])
def test_converted_models_quantize_and_fold(builder):
    converted = convert_batchnorms(_randomize_batchnorms(builder()))
    set_switches(converted, quantize=True)
    folded = fold_batchnorms(converted)
    parity(converted, folded, _x(), tolerance=1e-4)
    quantize_model(converted, QuantConfig())


def test_a_subclassed_model_is_refused_in_one_line():
    class Net(tf_keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net(np.zeros((1, 3), np.float32))
    with pytest.raises(ConfigError, match="subclassed model .* functional API") as caught:
        convert_batchnorms(net)
    assert "\n" not in str(caught.value)


def test_channels_first_batchnorm_is_refused():
    inputs = tf_keras.Input((3, 8, 8))
    model = tf_keras.Model(inputs, layers.BatchNormalization(axis=1, name="bn_cf")(inputs))
    with pytest.raises(ConfigError, match="bn_cf .* channels-last"):
        convert_batchnorms(model)


def test_duplicate_layer_names_across_nested_models_are_refused():
    def block():
        i = tf_keras.Input((4,))
        return tf_keras.Model(i, layers.Dense(4, name="same")(i))

    inputs = tf_keras.Input((4,))
    model = tf_keras.Model(inputs, block()(block()(inputs)))
    with pytest.raises(ConfigError, match="'same' appears"):
        convert_batchnorms(model)


def rewritten_layers():
    """Layers tfmot cannot wrap or TFLite splits: TFOpLambda arithmetic (tensor and scalar),
    SeparableConv2D, a conv with swish built in, swish as a layer and as tf.nn.silu,
    tf.math.sigmoid/tanh, a spatial tf.math.reduce_mean (squeeze-excite's), Normalization, a
    nested Sequential."""
    inputs = tf_keras.Input((8, 8, 3))
    x = layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inputs)
    norm = layers.Normalization(mean=[0.5, 0.2, -0.1], variance=[2.0, 0.5, 1.5], name="norm")
    x = norm(x)
    x = layers.SeparableConv2D(6, 3, padding="same", name="sep")(x)
    y = layers.Conv2D(6, 1, activation="swish", name="conv_swish")(x)
    y = layers.Activation("swish", name="act_swish")(tf.nn.silu(y))
    x = tf.nn.relu6(x + 3.0) * (1.0 / 6.0)  # MobileNetV3's hard-sigmoid
    x = 2.0 - x * y
    x = tf.math.tanh(x) + tf.math.sigmoid(y)
    x = x * tf.math.reduce_mean(x, axis=[1, 2], keepdims=True)
    block = tf_keras.Sequential([layers.Conv2D(4, 1, name="inner_conv"),
                                 layers.BatchNormalization(name="inner_bn")], name="block")
    x = layers.GlobalAveragePooling2D(name="gap")(block(x))
    return tf_keras.Model(inputs, layers.Dense(3, name="logits")(x))


def test_rewrites_compute_the_same_function_and_quantize():
    model = _randomize_batchnorms(rewritten_layers())
    converted = convert_batchnorms(model)
    kinds = {type(layer).__name__ for layer in converted.layers}
    assert not kinds & {"TFOpLambda", "SeparableConv2D", "Normalization", "Rescaling",
                        "Sequential"}
    assert converted.get_layer("conv_swish").get_config()["activation"] == "linear"
    # swish is LOGISTIC + MUL in the file: a sigmoid (its fixed grid) and a Multiply
    assert type(converted.get_layer("conv_swish_swish")).__name__ == "Multiply"
    assert converted.get_layer("act_swish_sigmoid").get_config()["activation"] == "sigmoid"
    assert sorted(type(layer).__name__ for layer in consumers(converted.get_layer("conv_swish"))) \
        == ["Activation", "Multiply"]
    assert type(converted.get_layer("sep_depthwise")).__name__ == "DepthwiseConv2D"
    x = _x()
    np.testing.assert_allclose(converted(x, training=False).numpy(),
                               model(x, training=False).numpy(), rtol=1e-5, atol=1e-5)
    quantize_model(converted, QuantConfig())


def test_a_mean_over_other_axes_than_the_spatial_ones_is_refused_in_one_line():
    inputs = tf_keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, name="conv")(inputs)
    channel_mean = tf_keras.Model(inputs, tf.math.reduce_mean(x, axis=-1, keepdims=True))
    with pytest.raises(ConfigError, match=r"averages over axes -1 of a rank-4 tensor"):
        convert_batchnorms(channel_mean)
