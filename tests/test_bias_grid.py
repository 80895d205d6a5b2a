"""The QAT model's inference rounds each folded bias onto the int8 file's int32 grid
(qat.bias_grid), so it computes what the file computes, to a small fraction of an output step."""

import numpy as np
import pytest
import tf_keras

from qat.config import DataConfig, ModelConfig, QuantConfig
from qat.data import load_arrays

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits():
    return load_arrays(DataConfig())


def _logits(qmodel, images, file_bias: bool) -> np.ndarray:
    from qat.quantize import activation_quantizers

    for quantizer in activation_quantizers(qmodel):
        quantizer.file_bias = file_bias
    return np.concatenate([qmodel(images[i:i + 512], training=False).numpy()
                           for i in range(0, len(images), 512)])


# Measured (1796 images; mean |QAT − file| in steps of the int8 logits; argmax agreement):
# convnet fold w4a4 0.00006 (1.000) with the bias rounded, 1.82 (0.991) with the float bias;
# mobilenet params w8a8 0.0007 (1.000), 0.385 (0.995); relu6 net w8a8 0.0001 (1.000), 0.082
# (1.000), and 0.037 with its two BNs that fold into nothing left unrounded.
def _relu6_net(input_shape):
    """ReLU6 after conv + BN and after depthwise + BN, a conv with its own ReLU, biased convs
    without BN, BNs after an Add and after pooling (Keras BN, converted by qat.prepare)."""
    from qat.api import prepare

    layers = tf_keras.layers
    inputs = tf_keras.Input(input_shape)
    x = layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = layers.ReLU(6.0)(layers.BatchNormalization()(x))
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = layers.ReLU(6.0)(layers.BatchNormalization()(x))
    x = layers.Conv2D(16, 1, activation="relu")(x)
    x = layers.Add()([layers.Conv2D(16, 3, padding="same")(x), x])
    x = layers.ReLU()(layers.BatchNormalization()(x))  # a BN with nothing to fold into
    x = layers.Conv2D(16, 3, strides=2)(x)
    x = layers.BatchNormalization()(layers.GlobalAveragePooling2D()(x))  # N×C, likewise
    return prepare(tf_keras.Model(inputs, layers.Dense(10)(x)))


@pytest.mark.parametrize("name, bn, bits", [("convnet", "fold", 4), ("mobilenet", "params", 8),
                                            ("relu6", "params", 8)])
def test_the_qat_model_computes_the_int8_files_bias(digits, tmp_path, name, bn, bits):
    """Conv, depthwise and dense biases, folded BNs in both modes, ReLU6 and a conv's own ReLU,
    4 and 8 bits: the file's logits and the QAT model's differ by a few thousandths of a step on
    average, and by ten times more where the QAT model adds its float bias instead."""
    from qat.api import export_model
    from qat.export import TFLiteModel
    from qat.models import build_model
    from qat.quantize import quantize_model

    tf_keras.utils.set_random_seed(0)
    loss = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = _relu6_net(digits.input_shape) if name == "relu6" else build_model(
        ModelConfig(name=name, width=8), digits.input_shape, 10)
    model.compile(tf_keras.optimizers.Adam(3e-3), loss)
    model.fit(digits.x_train, digits.y_train, batch_size=64, epochs=3, verbose=0)
    cfg = QuantConfig(bn=bn, weight_bits=bits, activation_bits=bits, input_range=[0.0, 1.0])
    qmodel = quantize_model(model, cfg)
    qmodel.compile(tf_keras.optimizers.Adam(1e-3), loss)
    qmodel.fit(digits.x_train, digits.y_train, batch_size=64, epochs=1, verbose=0)
    report = export_model(qmodel, model, digits.x_val, digits.y_val, str(tmp_path))
    assert report["int8_float_ops"] == []  # the rounding is no op of the converted graph

    images = np.concatenate([digits.x_train, digits.x_val])
    file_logits = TFLiteModel(str(tmp_path / "model_int8.tflite"))(images)
    step = np.min(np.diff(np.unique(file_logits)))  # the int8 logits' step
    rounded, unrounded = (_logits(qmodel, images, on) for on in (True, False))
    error = np.mean(np.abs(rounded - file_logits)) / step
    float_bias_error = np.mean(np.abs(unrounded - file_logits)) / step
    assert error < 0.02 and float_bias_error > 10 * error, (error, float_bias_error)
    assert np.mean(rounded.argmax(-1) == file_logits.argmax(-1)) >= 0.999


@pytest.mark.parametrize("axis, shape, rounded", [(-1, (None, None, 3), True),
                                                  (0, (8, 8, 3), False),
                                                  (1, (None, None, 3), False)])
def test_concatenations_with_parts_of_unknown_length_run(axis, shape, rounded):
    """A concatenation's rounding is laid out along its axis: on the batch axis (its inputs keep
    their own ranges) or with a dynamic height, the parts' lengths are not known when the graph
    is built; the rounding is then skipped (README) instead of failing every inference call.
    On the channel axis the lengths are the channel counts: rounded at any height."""
    from tf_keras import layers

    from qat.bias_grid import bias_rounding
    from qat.quantize import quantize_model, wrappers

    inputs = tf_keras.Input(shape)
    parts = [layers.Conv2D(4, 1, name=name)(inputs) for name in ("a", "b")]
    x = layers.Concatenate(axis=axis, name="cat")(parts)
    qmodel = quantize_model(tf_keras.Model(inputs, layers.GlobalAveragePooling2D()(x)),
                            QuantConfig())
    x = np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
    qmodel(x, training=True)
    assert np.isfinite(qmodel(x, training=False).numpy()).all()
    assert (bias_rounding(wrappers(qmodel)["cat"]) is not None) == rounded


@pytest.mark.parametrize("model_name, quant", [
    ("convnet", QuantConfig()), ("mobilenet", QuantConfig(bn="fold")),
    ("convnet", QuantConfig(weight_bits=4, range="learned")),
    ("mobilenet", QuantConfig(weight_bits=4, range="learned", bn="fold"))])
def test_quantizing_the_channel_extremes_gives_the_quantized_kernels_extremes(model_name, quant):
    """Every kernel quantizer (per channel, per tensor, depthwise, folded, learned): the
    stand-in `channel_extremes` quantizes to the same per-channel max and min, bit for bit."""
    from qat.bias_grid import channel_extremes
    from qat.models import build_model
    from qat.quant_ops import depthwise_output_channels
    from qat.quantize import quantize_model, wrappers

    qmodel = quantize_model(build_model(ModelConfig(name=model_name, width=32), (16, 16, 1), 10),
                            quant)
    x = np.random.default_rng(0).uniform(0, 1, (8, 16, 16, 1)).astype("float32")
    qmodel(x, training=True)
    checked = 0
    for wrapper in wrappers(qmodel).values():
        for weight, quantizer, qvars in wrapper._weight_vars:
            depthwise = type(wrapper.layer).__name__ == "DepthwiseConv2D"
            weight.assign(weight * 1.05)  # past the stored ranges: the clamp counts too
            full = quantizer(weight, False, qvars)
            ends = quantizer(channel_extremes(weight, 2 if depthwise else 1), False, qvars)
            if depthwise:
                full, ends = depthwise_output_channels(full), depthwise_output_channels(ends)
            full = full.numpy().reshape(-1, full.shape[-1])
            ends = ends.numpy().reshape(-1, ends.shape[-1])
            np.testing.assert_array_equal(ends.max(0), full.max(0), err_msg=wrapper.name)
            np.testing.assert_array_equal(ends.min(0), full.min(0), err_msg=wrapper.name)
            checked += 1
    assert checked >= 3
