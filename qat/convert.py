"""Conversion: a user's float Keras model, with every Keras BatchNormalization as qat's BN.

The converted model is one flat functional graph (nested models inlined, see `qat.graph`) whose
layers carry the original weights; the few layers tfmot cannot wrap are rewritten as plain
layers computing the same function (`convert_batchnorms`). Each BN keeps its momentum, epsilon,
center/scale and `trainable` flag, so in inference it computes what the original computes, and
in training it continues as Keras would (a frozen Keras BN, `trainable=False`, keeps normalizing
with its moving statistics). Everything downstream (quantize, fold, export) sees only qat's BN.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import tf_keras

from qat.errors import ConfigError
from qat.graph import copy_layer, flat_layers, is_keras_tensor, rebuild, require_graph_network
from qat.layers import QuantBatchNorm, ScalarArithmetic
from qat.rules import FUSED_ACTIVATIONS


def _check_axis(layer: tf_keras.layers.BatchNormalization) -> None:
    rank = layer.input_spec.ndim  # set when the layer was built; Keras stores positive axes
    if list(layer.axis) != [rank - 1]:
        raise ConfigError(f"layer {layer.name} (BatchNormalization) normalizes axis {layer.axis} "
                          f"of a rank-{rank} input: qat's BN takes channels-last inputs only "
                          "(NHWC or N×C); build the model with data_format='channels_last'")


def qat_batchnorm_from(layer: tf_keras.layers.BatchNormalization) -> QuantBatchNorm:
    """qat's BN with the Keras layer's settings (weights are copied once it is built)."""
    _check_axis(layer)
    return QuantBatchNorm(momentum=layer.momentum, epsilon=layer.epsilon, center=layer.center,
                          scale=layer.scale, name=layer.name, trainable=layer.trainable,
                          synchronized=bool(getattr(layer, "synchronized", False)))


def _batchnorm_weights(layer: tf_keras.layers.BatchNormalization) -> dict:
    values = {"moving_mean": layer.moving_mean, "moving_variance": layer.moving_variance}
    if layer.scale:
        values["gamma"] = layer.gamma
    if layer.center:
        values["beta"] = layer.beta
    return {name: variable.numpy() for name, variable in values.items()}


ARITHMETIC = {"__operators__.add": "add", "math.add": "add", "math.multiply": "multiply",
              "__operators__.mul": "multiply", "__operators__.sub": "subtract",
              "math.subtract": "subtract"}
MERGE_LAYERS = {"add": tf_keras.layers.Add, "multiply": tf_keras.layers.Multiply,
                "subtract": tf_keras.layers.Subtract}


def _arithmetic(layer, op: str):
    """`a + b` on Keras tensors (a TFOpLambda) as an Add/Multiply/Subtract layer, or with a
    scalar constant as ScalarArithmetic: layers tfmot can wrap and qat has rules for."""
    def call(a, b, name=None):
        if is_keras_tensor(a) and is_keras_tensor(b):
            return MERGE_LAYERS[op](name=layer.name)([a, b])
        tensor, constant = (a, b) if is_keras_tensor(a) else (b, a)
        if np.ndim(constant) != 0:
            raise ConfigError(f"layer {layer.name} (tf.{layer.get_config()['function']}) uses a "
                              "non-scalar constant: qat supports scalars there; use a layer")
        op_name = "subtract_from" if op == "subtract" and tensor is b else op
        return ScalarArithmetic(op_name, float(constant), name=layer.name)(tensor)
    return call


SWISH = ("swish", "silu")


def _swish(name: str):
    """swish(x) = x·sigmoid(x) as the two layers TFLite computes it with (LOGISTIC, MUL): the
    sigmoid's output lies on LOGISTIC's fixed int8 grid in the file, so the QAT model must
    round it there too (`qat.rules.UNIT_GRID`), which one swish layer cannot."""
    sigmoid = tf_keras.layers.Activation("sigmoid", name=f"{name}_sigmoid")
    multiply = tf_keras.layers.Multiply(name=name)
    return lambda x, **kwargs: multiply([x, sigmoid(x)])


def _spatial_mean(layer):
    """tf.reduce_mean(x, axis=[1, 2]) on NHWC as GlobalAveragePooling2D (TFLite's MEAN)."""
    def call(x, axis=None, keepdims=False, name=None):
        rank = x.shape.rank
        axes = sorted(int(a) % rank for a in np.atleast_1d(axis)) if axis is not None else None
        if rank != 4 or axes != [1, 2]:
            raise ConfigError(f"layer {layer.name} (tf.math.reduce_mean) averages over axes "
                              f"{axis} of a rank-{rank} tensor: qat rewrites only the spatial "
                              "mean of NHWC (axis=[1, 2]); use a Keras layer for it")
        return tf_keras.layers.GlobalAveragePooling2D(keepdims=bool(keepdims),
                                                      name=layer.name)(x)
    return call


def _split_activation(layer):
    """A conv/dense with a built-in activation TFLite does not fuse (swish, sigmoid...) as the
    linear layer + an Activation layer, so the tensor between them gets a range."""
    config = layer.get_config()
    activation = config["activation"]
    config["activation"] = "linear"
    linear = layer.__class__.from_config(config)
    name = f"{layer.name}_{activation}"
    act = _swish(name) if activation in SWISH else tf_keras.layers.Activation(activation,
                                                                               name=name)
    return lambda *args, **kwargs: act(linear(*args, **kwargs))


def _split_separable(layer):
    """SeparableConv2D as DepthwiseConv2D + 1×1 Conv2D: TFLite runs the two ops anyway, and
    the tensor between them needs a range (and each BN-free kernel its own per-channel grid)."""
    config = layer.get_config()
    depthwise = tf_keras.layers.DepthwiseConv2D(
        config["kernel_size"], strides=config["strides"], padding=config["padding"],
        depth_multiplier=config["depth_multiplier"], dilation_rate=config["dilation_rate"],
        use_bias=False, name=f"{layer.name}_depthwise")
    pointwise = tf_keras.layers.Conv2D(config["filters"], 1, use_bias=config["use_bias"],
                                       activation=config["activation"], name=layer.name)
    return lambda x, **kwargs: pointwise(depthwise(x))


def _replacement(layer):
    kind = type(layer).__name__
    if isinstance(layer, tf_keras.layers.BatchNormalization):
        return qat_batchnorm_from(layer)
    if kind == "TFOpLambda":
        function = layer.get_config()["function"]
        if function in ARITHMETIC:
            return _arithmetic(layer, ARITHMETIC[function])
        if function in ("nn.relu", "nn.relu6"):
            relu = tf_keras.layers.ReLU(6.0 if function == "nn.relu6" else None, name=layer.name)
            return lambda x, **kwargs: relu(x)
        if function in ("nn.silu", "nn.swish"):
            return _swish(layer.name)
        if function in ("math.sigmoid", "math.tanh"):
            activation = tf_keras.layers.Activation(function.removeprefix("math."),
                                                     name=layer.name)
            return lambda x, **kwargs: activation(x)
        if function == "math.reduce_mean":
            return _spatial_mean(layer)
    if kind == "Activation" and layer.get_config()["activation"] in SWISH:
        return _swish(layer.name)
    if kind == "SeparableConv2D":
        return _split_separable(layer)
    if _is_nhwc_affine(layer):
        return tf_keras.layers.DepthwiseConv2D(1, use_bias=True, name=layer.name)
    if kind in ("Conv2D", "DepthwiseConv2D", "Dense", "SeparableConv2D") and (
            layer.get_config()["activation"] not in FUSED_ACTIVATIONS):
        return _split_activation(layer)
    return copy_layer(layer)


def _is_nhwc_affine(layer) -> bool:
    """A Normalization or Rescaling on NHWC: rewritten as a 1×1 depthwise conv."""
    return type(layer).__name__ in ("Normalization", "Rescaling") and len(layer.input_shape) == 4


def _affine_of(layer) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) per channel of a Normalization ((x - mean) / max(sqrt(var), eps)) or a
    Rescaling (x * scale + offset): one int8 op instead of a MUL and an ADD (or SUB and DIV),
    whose intermediate tensor would have no range."""
    channels = layer.input_shape[-1]
    if type(layer).__name__ == "Rescaling":
        config = layer.get_config()
        return (np.full(channels, config["scale"], np.float32),
                np.full(channels, config["offset"], np.float32))
    std = np.maximum(np.sqrt(layer.variance.numpy()), tf_keras.backend.epsilon()).reshape(-1)
    std = np.broadcast_to(std, (channels,))
    mean = np.broadcast_to(layer.mean.numpy().reshape(-1), (channels,))
    return (1.0 / std).astype(np.float32), (-mean / std).astype(np.float32)


def _copy_weights(layer, converted: tf_keras.Model) -> None:
    kind = type(layer).__name__
    if isinstance(layer, tf_keras.layers.BatchNormalization):
        target = converted.get_layer(layer.name)
        for name, value in _batchnorm_weights(layer).items():
            getattr(target, name).assign(value)
    elif kind == "SeparableConv2D":
        depthwise, pointwise, *bias = layer.get_weights()
        converted.get_layer(f"{layer.name}_depthwise").set_weights([depthwise])
        converted.get_layer(layer.name).set_weights([pointwise, *bias])
    elif _is_nhwc_affine(layer):
        scale, offset = _affine_of(layer)  # per channel, as a 1×1 depthwise conv
        converted.get_layer(layer.name).set_weights([scale.reshape(1, 1, -1, 1), offset])
    elif layer.weights:
        converted.get_layer(layer.name).set_weights(layer.get_weights())


def convert_batchnorms(model: tf_keras.Model) -> tf_keras.Model:
    """A flat functional copy of `model` that qat can quantize: qat's BN in place of every Keras
    BN, and the few layers tfmot cannot wrap or TFLite computes in two ops rewritten as plain
    layers (TFOpLambda arithmetic, SeparableConv2D, unfused built-in activations, NHWC
    Normalization and Rescaling).
    Every rewrite computes the same function (tested)."""
    require_graph_network(model)
    layers = flat_layers(model)
    duplicates = [name for name, n in Counter(layer.name for layer in layers).items() if n > 1]
    if duplicates:
        raise ConfigError(f"layer name {duplicates[0]!r} appears {len(duplicates)} time(s) in "
                          "nested models: qat flattens them into one graph, so rename the layers "
                          "(e.g. build each copy with a name prefix)")
    converted = rebuild(model, _replacement)
    for layer in layers:
        if not isinstance(layer, tf_keras.layers.InputLayer):
            _copy_weights(layer, converted)
    return converted
