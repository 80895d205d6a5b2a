"""Model builders. Each takes a BN factory, so every model normalizes with qat's layer.

Every conv/depthwise/dense that feeds a BN has `use_bias=False` (the BN's beta is the bias) and a
linear activation; ReLU is its own layer. That is the layout tfmot's patterns and qat's folding
both recognize, and what TFLite fuses into one int8 op.
"""

from __future__ import annotations

from collections.abc import Callable

import tf_keras
from tf_keras import layers

from qat.config import ModelConfig
from qat.layers import QuantBatchNorm

BatchNormFactory = Callable[[str], tf_keras.layers.Layer]


def batchnorm_factory(cfg: ModelConfig) -> BatchNormFactory:
    """qat's BN with the configured momentum and epsilon; quantization settings come later."""
    return lambda name: QuantBatchNorm(momentum=cfg.bn_momentum, epsilon=cfg.bn_epsilon, name=name)


def build_model(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int,
                bn: BatchNormFactory | None = None) -> tf_keras.Model:
    """Build the configured architecture (functional, NHWC input, logits output)."""
    builders = {"convnet": convnet, "resnet": resnet, "mobilenet": mobilenet}
    return builders[cfg.name](input_shape, num_classes, cfg.width, bn or batchnorm_factory(cfg))


def _conv_bn_relu(x, filters: int, name: str, bn: BatchNormFactory, *, strides: int = 1,
                  relu: bool = True):
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False,
                      name=f"{name}_conv")(x)
    x = bn(f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _head(x, num_classes: int, hidden: int, bn: BatchNormFactory):
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(hidden, use_bias=False, name="fc_dense")(x)
    x = bn("fc_bn")(x)
    x = layers.ReLU(name="fc_relu")(x)
    return layers.Dense(num_classes, name="logits")(x)


def convnet(input_shape, num_classes: int, width: int, bn: BatchNormFactory) -> tf_keras.Model:
    """VGG-style: two conv stages separated by max-pooling, then a dense-BN-ReLU head."""
    inputs = tf_keras.Input(shape=input_shape, name="image")
    x = _conv_bn_relu(inputs, width, "block1a", bn)
    x = _conv_bn_relu(x, width, "block1b", bn)
    x = layers.MaxPooling2D(name="block1_pool")(x)
    x = _conv_bn_relu(x, 2 * width, "block2a", bn)
    x = _conv_bn_relu(x, 2 * width, "block2b", bn)
    return tf_keras.Model(inputs, _head(x, num_classes, 4 * width, bn), name="convnet")


def resnet(input_shape, num_classes: int, width: int, bn: BatchNormFactory) -> tf_keras.Model:
    """Small ResNet: a stem and two residual stages (the second downsamples with a 1x1 shortcut)."""
    inputs = tf_keras.Input(shape=input_shape, name="image")
    x = _conv_bn_relu(inputs, width, "stem", bn)
    for stage, (filters, strides) in enumerate([(width, 1), (2 * width, 2)], start=1):
        name = f"res{stage}"
        shortcut = x
        y = _conv_bn_relu(x, filters, f"{name}a", bn, strides=strides)
        y = _conv_bn_relu(y, filters, f"{name}b", bn, relu=False)
        if strides != 1 or int(shortcut.shape[-1]) != filters:
            shortcut = layers.Conv2D(filters, 1, strides=strides, use_bias=False,
                                     name=f"{name}_proj_conv")(shortcut)
            shortcut = bn(f"{name}_proj_bn")(shortcut)
        x = layers.Add(name=f"{name}_add")([y, shortcut])
        x = layers.ReLU(name=f"{name}_relu")(x)
    return tf_keras.Model(inputs, _head(x, num_classes, 4 * width, bn), name="resnet")


def mobilenet(input_shape, num_classes: int, width: int, bn: BatchNormFactory) -> tf_keras.Model:
    """MobileNet-style: a stem, then depthwise-BN-ReLU + pointwise-BN-ReLU blocks."""
    inputs = tf_keras.Input(shape=input_shape, name="image")
    x = _conv_bn_relu(inputs, width, "stem", bn)
    for i, (filters, strides) in enumerate([(width, 1), (2 * width, 2), (2 * width, 1)], start=1):
        name = f"dw{i}"
        x = layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False,
                                   name=f"{name}_depthwise")(x)
        x = bn(f"{name}_dw_bn")(x)
        x = layers.ReLU(name=f"{name}_dw_relu")(x)
        x = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_pointwise")(x)
        x = bn(f"{name}_pw_bn")(x)
        x = layers.ReLU(name=f"{name}_pw_relu")(x)
    return tf_keras.Model(inputs, _head(x, num_classes, 4 * width, bn), name="mobilenet")
