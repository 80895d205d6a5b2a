"""qat's BatchNorm layer: fused kernels in every mode, quantization selected by a switch variable.

Why a layer of our own: quantizing BN's parameters during fine-tuning means ops on gamma, beta and
the moving statistics. Written as elementwise math (moments + arithmetic) BN runs ~2.5x slower than
the fused kernel. Here the `tf.cond` only selects between the float and the fake-quantized
*per-channel vectors* (C values each); both feed the same FusedBatchNormV3 kernel, so the quantized
mode costs a few tiny ops per layer. Flipping the switch variable needs no rebuild and no retrace.
"""

from __future__ import annotations

import tensorflow as tf
import tf_keras

from qat.config import BN_VARIANCE_TARGETS
from qat.quant_ops import fake_quant


class QuantBatchNorm(tf_keras.layers.Layer):
    """BatchNorm over the last axis (NHWC or N×C) on the fused kernel, with fake-quant parameters.

    Weights (the checkpoint keys users see): `gamma`, `beta`, `moving_mean`, `moving_variance`
    (as in Keras' BatchNormalization), plus two int32 scalar switches:
      * `quant_switch`  — 1: gamma, beta, moving mean and the variance term are fake-quantized
        (`bn_bits`, symmetric or not, per tensor or per channel) before the kernel sees them.
      * `freeze_switch` — 1: training no longer uses or updates batch statistics; the layer
        normalizes with the (quantized) moving statistics, as int8 hardware will
        (Jacob et al. 2018, Krishnamoorthi 2018).
    `bn_variance` chooses what is quantized for sigma^2: `inv_std` = 1/sqrt(sigma^2 + eps), the
    multiplier integer hardware stores after folding (the default), or `variance` itself.
    """

    def __init__(self, momentum: float = 0.99, epsilon: float = 1e-3, bn_bits: int = 8,
                 bn_symmetric: bool = True, bn_per_channel: bool = False,
                 bn_variance: str = "inv_std", **kwargs):
        super().__init__(**kwargs)
        if bn_variance not in BN_VARIANCE_TARGETS:
            raise ValueError(f"bn_variance={bn_variance!r}: use one of {BN_VARIANCE_TARGETS}")
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.bn_bits = int(bn_bits)
        self.bn_symmetric = bool(bn_symmetric)
        self.bn_per_channel = bool(bn_per_channel)
        self.bn_variance = bn_variance
        self.supports_masking = True

    def build(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        if input_shape.rank not in (2, 4):
            raise ValueError(f"QuantBatchNorm takes N×C or NHWC inputs, got shape {input_shape}")
        channels = int(input_shape[-1])
        self.input_spec = tf_keras.layers.InputSpec(ndim=input_shape.rank, axes={-1: channels})
        stat = {"shape": (channels,), "trainable": False,
                "synchronization": tf.VariableSynchronization.ON_READ,
                "aggregation": tf.VariableAggregation.MEAN}
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros")
        self.moving_mean = self.add_weight(name="moving_mean", initializer="zeros", **stat)
        self.moving_variance = self.add_weight(name="moving_variance", initializer="ones", **stat)
        switch = {"shape": (), "dtype": tf.int32, "trainable": False, "initializer": "zeros",
                  "aggregation": tf.VariableAggregation.ONLY_FIRST_REPLICA}
        self.quant_switch = self.add_weight(name="quant_switch", **switch)
        self.freeze_switch = self.add_weight(name="freeze_switch", **switch)
        super().build(input_shape)

    # -- parameters -------------------------------------------------------------------------
    def _fake_quant_vectors(self, *vectors: tf.Tensor) -> list[tf.Tensor]:
        """Fake-quantize per-channel vectors, each on its own range, in one FakeQuant op.

        Stacked as C×k columns, a per-channel FakeQuant gives each vector its own range; with
        `bn_per_channel` every element is its own channel. One op instead of k keeps the
        quantized mode within a few percent of the float one.
        """
        stacked = tf.stack(vectors, axis=-1)
        if self.bn_per_channel:
            stacked = tf.reshape(stacked, (1, -1))
        quantized = fake_quant(stacked, num_bits=self.bn_bits, symmetric=self.bn_symmetric,
                               per_channel=True, narrow_range=self.bn_symmetric)
        return tf.unstack(tf.reshape(quantized, (-1, len(vectors))), axis=-1)

    def scale_and_shift(self) -> tuple[tf.Tensor, tf.Tensor]:
        """(gamma, beta): fake-quantized when the quant switch is on."""
        float_values = (tf.convert_to_tensor(self.gamma), tf.convert_to_tensor(self.beta))
        return tf.cond(tf.not_equal(self.quant_switch, 0),
                       lambda: tuple(self._fake_quant_vectors(self.gamma, self.beta)),
                       lambda: float_values)

    def _quantized_moving_stats(self) -> tuple[tf.Tensor, tf.Tensor]:
        if self.bn_variance == "variance":
            mean, variance = self._fake_quant_vectors(self.moving_mean, self.moving_variance)
            return mean, tf.maximum(variance, 0.0)
        mean, inv_std = self._fake_quant_vectors(
            self.moving_mean, tf.math.rsqrt(self.moving_variance + self.epsilon))
        # Feed the kernel the variance whose rsqrt(var + eps) is exactly the quantized inv_std;
        # an inv_std rounded to 0 becomes a huge variance (the channel outputs beta).
        inv_std = tf.maximum(inv_std, 1e-12)
        return mean, 1.0 / tf.square(inv_std) - self.epsilon

    def moving_stats(self) -> tuple[tf.Tensor, tf.Tensor]:
        """(mean, variance) for inference: fake-quantized when the quant switch is on."""
        float_values = (tf.convert_to_tensor(self.moving_mean),
                        tf.convert_to_tensor(self.moving_variance))
        return tf.cond(tf.not_equal(self.quant_switch, 0), self._quantized_moving_stats,
                       lambda: float_values)

    def effective_params(self) -> tuple[tf.Tensor, ...]:
        """(gamma, beta, mean, variance) as inference uses them: quantized when the switch is on."""
        return (*self.scale_and_shift(), *self.moving_stats())

    # -- forward ----------------------------------------------------------------------------
    def call(self, inputs, training=None):
        x = inputs
        rank2 = x.shape.rank == 2
        if rank2:  # the fused kernel wants 4-D: N×C -> N×1×1×C is the same normalization
            x = x[:, None, None, :]
        gamma, beta = self.scale_and_shift()

        def with_moving_stats():
            mean, variance = self.moving_stats()  # only computed where it is used
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, mean=mean, variance=variance, epsilon=self.epsilon,
                is_training=False)
            return y, tf.identity(self.moving_mean), tf.identity(self.moving_variance)

        def with_batch_stats():
            # The kernel returns the updated moving averages (Bessel-corrected variance) itself.
            return tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, mean=self.moving_mean, variance=self.moving_variance,
                epsilon=self.epsilon, is_training=True, exponential_avg_factor=1.0 - self.momentum)

        if training is None:
            training = tf_keras.backend.learning_phase()
        if isinstance(training, (bool, int)):
            training = bool(training)
            if not training:
                y = with_moving_stats()[0]
                return y[:, 0, 0, :] if rank2 else y
        use_batch = tf.logical_and(tf.cast(training, tf.bool),
                                   tf.equal(self.freeze_switch, 0))
        y, new_mean, new_variance = tf.cond(use_batch, with_batch_stats, with_moving_stats)
        self.moving_mean.assign(new_mean)
        self.moving_variance.assign(new_variance)
        return y[:, 0, 0, :] if rank2 else y

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(momentum=self.momentum, epsilon=self.epsilon, bn_bits=self.bn_bits,
                      bn_symmetric=self.bn_symmetric, bn_per_channel=self.bn_per_channel,
                      bn_variance=self.bn_variance)
        return config


class ChannelAffine(tf_keras.layers.Layer):
    """y = x * scale + offset per channel: what a BN with nothing to fold into becomes."""

    def build(self, input_shape):
        channels = int(input_shape[-1])
        self.scale = self.add_weight(name="scale", shape=(channels,), initializer="ones")
        self.offset = self.add_weight(name="offset", shape=(channels,), initializer="zeros")
        super().build(input_shape)

    def call(self, inputs):
        return inputs * self.scale + self.offset

    def compute_output_shape(self, input_shape):
        return input_shape


def batchnorm_layers(model: tf_keras.Model) -> list[QuantBatchNorm]:
    """Every QuantBatchNorm in `model`, looking inside tfmot's wrappers."""
    found = []
    for layer in model.submodules:
        if isinstance(layer, QuantBatchNorm):
            found.append(layer)
    return found


def set_switches(model: tf_keras.Model, *, quantize: bool | None = None,
                 freeze: bool | None = None, layers: list[QuantBatchNorm] | None = None) -> None:
    """Flip the BN switches in place: no rebuild, no retrace."""
    for layer in layers if layers is not None else batchnorm_layers(model):
        if quantize is not None:
            layer.quant_switch.assign(int(quantize))
        if freeze is not None:
            layer.freeze_switch.assign(int(freeze))


CUSTOM_OBJECTS = {"QuantBatchNorm": QuantBatchNorm, "ChannelAffine": ChannelAffine}
