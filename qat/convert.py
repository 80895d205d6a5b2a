"""Conversion: a user's float Keras model, with every Keras BatchNormalization as qat's BN.

The converted model is one flat functional graph (nested models inlined, see `qat.graph`) whose
layers carry the original weights; each BN keeps its momentum, epsilon, center/scale and
`trainable` flag, so in inference it computes what the original computes, and in training it
continues as Keras would (a frozen Keras BN, `trainable=False`, keeps normalizing with its
moving statistics). Everything downstream (quantize, fold, export) sees only qat's BN.
"""

from __future__ import annotations

from collections import Counter

import tf_keras

from qat.errors import ConfigError
from qat.graph import copy_layer, flat_layers, rebuild, require_graph_network
from qat.layers import QuantBatchNorm


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
                          scale=layer.scale, name=layer.name, trainable=layer.trainable)


def _batchnorm_weights(layer: tf_keras.layers.BatchNormalization) -> dict:
    values = {"moving_mean": layer.moving_mean, "moving_variance": layer.moving_variance}
    if layer.scale:
        values["gamma"] = layer.gamma
    if layer.center:
        values["beta"] = layer.beta
    return {name: variable.numpy() for name, variable in values.items()}


def convert_batchnorms(model: tf_keras.Model) -> tf_keras.Model:
    """A flat functional copy of `model` with qat's BN in place of every Keras BN."""
    require_graph_network(model)
    layers = flat_layers(model)
    duplicates = [name for name, n in Counter(layer.name for layer in layers).items() if n > 1]
    if duplicates:
        raise ConfigError(f"layer name {duplicates[0]!r} appears {len(duplicates)} time(s) in "
                          "nested models: qat flattens them into one graph, so rename the layers "
                          "(e.g. build each copy with a name prefix)")

    def replace(layer):
        if isinstance(layer, tf_keras.layers.BatchNormalization):
            return qat_batchnorm_from(layer)
        return copy_layer(layer)

    converted = rebuild(model, replace)
    for layer in layers:
        if isinstance(layer, tf_keras.layers.InputLayer):
            continue
        target = converted.get_layer(layer.name)
        if isinstance(layer, tf_keras.layers.BatchNormalization):
            for name, value in _batchnorm_weights(layer).items():
                getattr(target, name).assign(value)
        else:
            target.set_weights(layer.get_weights())
    return converted
