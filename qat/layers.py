"""qat's BatchNorm layer: fused kernels in every mode, quantization selected by a switch variable.

Why a layer of our own: quantizing BN's parameters during fine-tuning means ops on gamma, beta and
the moving statistics. Written as elementwise math (moments + arithmetic) BN runs ~2.5x slower than
the fused kernel. Here the `tf.cond` only selects whether a forward-only correction (fake-quantized
minus float *per-channel vectors*, C values each) is added; both modes feed the same
FusedBatchNormV3 kernel, so the quantized mode costs a few tiny ops per layer. Flipping the switch
variable needs no rebuild and no retrace.
"""

from __future__ import annotations

import tensorflow as tf
import tf_keras

from qat.config import BN_FORMATS, BN_TARGETS, BN_VARIANCE_TARGETS
from qat.distribute import replicas_in_sync
from qat.quant_ops import quantized_vectors


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: use one of {choices}")


class QuantBatchNorm(tf_keras.layers.Layer):
    """BatchNorm over the last axis (NHWC or N×C) on the fused kernel, with fake-quant parameters.

    Weights (the checkpoint keys users see): `gamma`, `beta`, `moving_mean`, `moving_variance`
    (as in Keras' BatchNormalization), plus two int32 scalar switches:
      * `quant_switch`  — 1: the BN's parameters are fake-quantized before the kernel sees them.
      * `freeze_switch` — 1: training no longer uses or updates batch statistics; the layer
        normalizes with the moving statistics, exactly as the exported file will
        (Jacob et al. 2018, Krishnamoorthi 2018).
    What is quantized (`bn_target`):
      * `affine` — the pair inference stores after folding: multiplier m = gamma/sqrt(var+eps) and
        offset o = beta - mean*m (moving statistics). The kernel is fed gamma' = m_q*sqrt(var+eps)
        and beta' = o_q + m_q*mean, so with moving statistics it computes m_q*x + o_q exactly, and
        with batch statistics it carries the same rounding; gamma and beta get identity gradients.
      * `params` — gamma, beta, mean and a variance term each (`bn_variance`: 1/sqrt(var+eps) or
        var itself), for fixed-point BN units that store them separately.
    In which number format (`bn_format`, see `qat.quant_ops`): `channel_exponent` or `tensor`.
    `synchronized`: training statistics over the global batch of every replica (`global_moments`),
    so the result does not depend on how many replicas share the batch.
    """

    def __init__(self, momentum: float = 0.99, epsilon: float = 1e-3, center: bool = True,
                 scale: bool = True, bn_bits: int = 8, bn_target: str = "affine",
                 bn_format: str = "channel_exponent", bn_variance: str = "inv_std",
                 synchronized: bool = False, **kwargs):
        super().__init__(**kwargs)
        _check_choice("bn_target", bn_target, BN_TARGETS)
        _check_choice("bn_format", bn_format, BN_FORMATS)
        _check_choice("bn_variance", bn_variance, BN_VARIANCE_TARGETS)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.bn_bits = int(bn_bits)
        self.bn_target = bn_target
        self.bn_format = bn_format
        self.bn_variance = bn_variance
        self.synchronized = bool(synchronized)
        self.supports_masking = True
        # Trace-time: whether training graphs read `freeze_switch` (a tf.cond per BN, ~20 % of a
        # MobileNetV2 float step on CPU, `make bench`). Off, training always normalizes with
        # batch statistics. Freezing turns it on: set_switches(freeze=True), and
        # FreezeBatchNormAfter before fit traces its step.
        self.freezable = False

    def build(self, input_shape):
        input_shape = tf.TensorShape(input_shape)
        if input_shape.rank not in (2, 4):
            raise ValueError(f"QuantBatchNorm takes N×C or NHWC inputs, got shape {input_shape}")
        channels = int(input_shape[-1])
        self.input_spec = tf_keras.layers.InputSpec(ndim=input_shape.rank, axes={-1: channels})
        stat = {"shape": (channels,), "trainable": False,
                "synchronization": tf.VariableSynchronization.ON_READ,
                "aggregation": tf.VariableAggregation.MEAN}
        # center/scale=False (as in Keras): beta 0 / gamma 1, kept as fixed weights so every BN
        # has the same variables and the fused kernel the same arguments.
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones",
                                     trainable=self.scale)
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros",
                                    trainable=self.center)
        self.moving_mean = self.add_weight(name="moving_mean", initializer="zeros", **stat)
        self.moving_variance = self.add_weight(name="moving_variance", initializer="ones", **stat)
        switch = {"shape": (), "dtype": tf.int32, "trainable": False, "initializer": "zeros",
                  "aggregation": tf.VariableAggregation.ONLY_FIRST_REPLICA}
        self.quant_switch = self.add_weight(name="quant_switch", **switch)
        self.freeze_switch = self.add_weight(name="freeze_switch", **switch)
        super().build(input_shape)

    # -- parameters -------------------------------------------------------------------------
    def _quantize(self, *vectors: tf.Tensor) -> list[tf.Tensor]:
        return quantized_vectors(list(vectors), self.bn_bits, self.bn_format)

    def _quantized_scale_and_shift(self, gamma, beta) -> tuple[tf.Tensor, tf.Tensor]:
        if self.bn_target == "params":
            return tuple(self._quantize(gamma, beta))
        mean = tf.convert_to_tensor(self.moving_mean)
        std = tf.sqrt(self.moving_variance + self.epsilon)
        multiplier = gamma / std
        multiplier_q, offset_q = self._quantize(multiplier, beta - mean * multiplier)
        return multiplier_q * std, offset_q + multiplier_q * mean

    def _quantized_moving_stats(self, mean, variance) -> tuple[tf.Tensor, tf.Tensor]:
        if self.bn_variance == "variance":
            mean, variance = self._quantize(mean, variance)
            return mean, tf.maximum(variance, 0.0)
        mean, inv_std = self._quantize(mean, tf.math.rsqrt(variance + self.epsilon))
        # Feed the kernel the variance whose rsqrt(var + eps) is exactly the quantized inv_std;
        # an inv_std rounded to 0 becomes a huge variance (the channel outputs beta).
        inv_std = tf.maximum(inv_std, 1e-12)
        return mean, 1.0 / tf.square(inv_std) - self.epsilon

    def _switched(self, quantized, float_values: tuple[tf.Tensor, tf.Tensor]):
        """`float_values`, or `quantized(*float_values)` when the switch is on, as float + a
        forward-only correction. The quantization's gradient is the identity (straight-through),
        so the cond is kept off the gradient tape: it sees the values behind a stop_gradient and
        reads no trainable variable. A cond on the tape keeps its intermediates for a backward
        pass (~4 ms of a 52 ms MobileNetV2 step on one CPU thread, `make bench`). The sum is the
        quantized value exactly where the two lie within a factor 2 of each other (Sterbenz),
        else to within a couple of float32 roundings (an affine beta': <= 2 ulp measured)."""
        detached = tuple(tf.stop_gradient(f) for f in float_values)

        def correction():
            return tuple(q - f for q, f in zip(quantized(*detached), detached, strict=True))

        corrections = tf.cond(tf.not_equal(self.quant_switch, 0), correction,
                              lambda: tuple(tf.zeros_like(f) for f in detached))
        return tuple(f + c for f, c in zip(float_values, corrections, strict=True))

    def scale_and_shift(self) -> tuple[tf.Tensor, tf.Tensor]:
        """(gamma, beta) as the kernel sees them: carrying the quantization when switched on."""
        return self._switched(self._quantized_scale_and_shift,
                              (tf.convert_to_tensor(self.gamma), tf.convert_to_tensor(self.beta)))

    def moving_stats(self) -> tuple[tf.Tensor, tf.Tensor]:
        """(mean, variance) for inference: quantized when switched on and `bn_target=params`."""
        float_values = (tf.convert_to_tensor(self.moving_mean),
                        tf.convert_to_tensor(self.moving_variance))
        if self.bn_target == "affine":  # the quantization is all in (gamma, beta)
            return float_values
        return self._switched(self._quantized_moving_stats, float_values)

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
            if not rank2:  # the kernel updates the moving averages itself, as Keras' fused BN
                return tf.compat.v1.nn.fused_batch_norm(
                    x, gamma, beta, mean=self.moving_mean, variance=self.moving_variance,
                    epsilon=self.epsilon, is_training=True,
                    exponential_avg_factor=1.0 - self.momentum)
            return self._rank2_batch_norm(x, gamma, beta)

        if training is None:
            training = tf_keras.backend.learning_phase()
        if not self.trainable:  # Keras: a frozen BN runs in inference mode (transfer learning)
            training = False
        if isinstance(training, (bool, int)):
            training = bool(training)
            if not training:
                y = with_moving_stats()[0]
                return y[:, 0, 0, :] if rank2 else y
        batch_only = training is True and not self.freezable  # no freeze asked for: no tf.cond
        use_batch = tf.constant(True) if batch_only else tf.logical_and(
            tf.cast(training, tf.bool), tf.equal(self.freeze_switch, 0))
        if self.synchronized:
            y, new_mean, new_variance = self._synchronized_batch_norm(x, gamma, beta, use_batch,
                                                                      rank2)
        elif batch_only:
            y, new_mean, new_variance = with_batch_stats()
        else:
            y, new_mean, new_variance = tf.cond(use_batch, with_batch_stats, with_moving_stats)
        self.moving_mean.assign(new_mean)
        self.moving_variance.assign(new_variance)
        return y[:, 0, 0, :] if rank2 else y

    def _synchronized_batch_norm(self, x, gamma, beta, use_batch, rank2: bool):
        """Training step on the global batch's statistics. Everything that crosses replicas or
        carries the custom gradient stays outside tf.cond (MirroredStrategy cannot synchronize
        inside a branch, and a custom gradient there loses its captures): the cond only picks
        which statistics feed the fused kernel's inference path. The moving variance averages
        the n/(n-1)-corrected global variance on NHWC, the biased one on N×C, as unsynchronized."""
        batch_mean, batch_variance, count = global_moments(x, self.moving_mean, use_batch)
        mean, variance = tf.cond(use_batch, lambda: (batch_mean, batch_variance),
                                 self.moving_stats)
        y = normalize_with_statistics(x, gamma, beta, mean, variance, self.epsilon)
        if not rank2:
            batch_variance = batch_variance * count / tf.maximum(count - 1.0, 1.0)
        return (y, *self._averaged(batch_mean, batch_variance,
                                   tf.where(use_batch, 1.0 - self.momentum, 0.0)))

    def _rank2_batch_norm(self, x, gamma, beta):
        """N×C training step with Keras' N×C statistics: the moving variance averages the biased
        batch variance (Keras' non-fused path), not the kernel's n/(n-1)-corrected one."""
        y, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, mean=self.moving_mean, variance=self.moving_variance,
            epsilon=self.epsilon, is_training=True, exponential_avg_factor=1.0)
        n = tf.cast(tf.shape(x)[0], x.dtype)
        biased = unbiased * (n - 1.0) / tf.maximum(n, 1.0)
        return (y, *self._averaged(mean, biased, 1.0 - self.momentum))

    def _averaged(self, mean, variance, decay):
        """The moving statistics after one batch, as Keras updates them:
        moving -= (moving - batch) * decay, with decay = 1 - momentum (0: left as they are)."""
        return (self.moving_mean - (self.moving_mean - mean) * decay,
                self.moving_variance - (self.moving_variance - variance) * decay)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(momentum=self.momentum, epsilon=self.epsilon, center=self.center,
                      scale=self.scale, bn_bits=self.bn_bits,
                      bn_target=self.bn_target, bn_format=self.bn_format,
                      bn_variance=self.bn_variance, synchronized=self.synchronized)
        return config


def global_moments(x, shift, use_batch):
    """(mean, biased variance, count) per channel of NHWC `x` over the global batch.

    Sums of (x - shift) and its square are all-reduced across replicas (one collective of 2C+1
    values), so 1 replica with batch B and R replicas with B/R each get the same moments.
    The sums are float64: a float32 sum depends on how the batch is split (~1e-7), and a
    fake-quant downstream turns such a difference into a whole step wherever a value sits on a
    rounding boundary; in float64 the moments round to the same float32 on any replica count.
    `shift` (the moving mean, no gradient) keeps E[d²] - E[d]² from cancelling when channel
    means are large. Where `use_batch` is false (inference, frozen) the local sums are zeros:
    every replica still joins the collective, but no pass over `x` is made.
    """
    shift = tf.stop_gradient(tf.convert_to_tensor(shift))
    channels = x.shape[-1]

    def local_sums():
        d = tf.cast(x - shift, tf.float64)
        return tf.stack([tf.reduce_sum(d, [0, 1, 2]), tf.reduce_sum(tf.square(d), [0, 1, 2])])

    sums = tf.cond(use_batch, local_sums, lambda: tf.zeros((2, channels), tf.float64))
    count = tf.cast(tf.size(x) // channels, tf.float64)
    if replicas_in_sync() > 1:
        sums, count = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, [sums, count])
    count = tf.maximum(count, 1.0)
    mean = sums[0] / count
    variance = tf.maximum(sums[1] / count - tf.square(mean), 0.0)
    return (tf.cast(mean, x.dtype) + shift, tf.cast(variance, x.dtype),
            tf.cast(count, x.dtype))


def normalize_with_statistics(x, gamma, beta, mean, variance, epsilon: float):
    """gamma·(x − mean)/√(variance + ε) + beta on the fused kernel's inference path, with the
    gradient reaching `mean` and `variance` too (the kernel's own gradient stops there).

    Both extra gradients come from the per-channel sums the kernel's backward already returns:
    dL/dmean = −γ·r·Σdy = −γ·r·dbeta and dL/dvariance = −½·γ·r²·Σdy·(x−mean)·r = −½·γ·r²·dgamma,
    with r = 1/√(variance + ε): no extra pass over the tensor.
    """
    @tf.custom_gradient
    def normalize(x, gamma, beta, mean, variance):
        y, _, _, _, _, reserve = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=gamma, offset=beta, mean=mean, variance=variance, epsilon=epsilon,
            is_training=False)

        def grad(dy):
            dx, dgamma, dbeta, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy, x=x, scale=gamma, reserve_space_1=mean, reserve_space_2=variance,
                reserve_space_3=reserve, epsilon=epsilon, is_training=False)
            inv_std = tf.math.rsqrt(variance + epsilon)
            return (dx, dgamma, dbeta, -gamma * inv_std * dbeta,
                    -0.5 * gamma * tf.square(inv_std) * dgamma)

        return y, grad

    return normalize(x, gamma, beta, mean, variance)


class ChannelAffine(tf_keras.layers.Layer):
    """y = x * scale + offset per channel of N×C inputs: what an N×C BN with nothing to fold
    into becomes. Computed as a 1×1 depthwise conv on N×1×1×C, so the int8 file holds a
    per-channel int8 DEPTHWISE_CONV_2D (between two RESHAPEs) instead of a float MUL and ADD;
    `kernel` is 1×1×C×1, like a depthwise kernel, and gets the depthwise kernel quantizer."""

    def build(self, input_shape):
        channels = int(input_shape[-1])
        self.kernel = self.add_weight(name="kernel", shape=(1, 1, channels, 1), initializer="ones")
        self.bias = self.add_weight(name="bias", shape=(channels,), initializer="zeros")
        super().build(input_shape)

    def call(self, inputs):
        channels = self.bias.shape[0]
        y = tf.nn.depthwise_conv2d(tf.reshape(inputs, (-1, 1, 1, channels)), self.kernel,
                                   (1, 1, 1, 1), "VALID")
        return tf.reshape(tf.nn.bias_add(y, self.bias), (-1, channels))

    def compute_output_shape(self, input_shape):
        return input_shape


class ScalarArithmetic(tf_keras.layers.Layer):
    """x + c, x * c, x - c or c - x with a Python scalar c: what keras.applications write as
    `x + 3.0` (a TFOpLambda, which tfmot's wrapper cannot call). The int8 file computes it as
    ADD / MUL / SUB with a constant operand."""

    OPS = ("add", "multiply", "subtract", "subtract_from")

    def __init__(self, op: str, value: float, **kwargs):
        super().__init__(**kwargs)
        if op not in self.OPS:
            raise ValueError(f"op={op!r}: use one of {self.OPS}")
        self.op, self.value = op, float(value)

    def call(self, inputs):
        c = tf.constant(self.value, inputs.dtype)
        return {"add": lambda: inputs + c, "multiply": lambda: inputs * c,
                "subtract": lambda: inputs - c, "subtract_from": lambda: c - inputs}[self.op]()

    def get_config(self) -> dict:
        return {**super().get_config(), "op": self.op, "value": self.value}


def batchnorm_layers(model: tf_keras.Model) -> list[QuantBatchNorm]:
    """Every QuantBatchNorm in `model`, looking inside tfmot's wrappers."""
    found = []
    for layer in model.submodules:
        if isinstance(layer, QuantBatchNorm):
            found.append(layer)
    return found


def synchronize_batchnorms(model: tf_keras.Model) -> None:
    """Every BN of `model` computes training statistics over the global batch (`model.sync_bn`).
    Before the model is first traced: the flag is read when the graph is built."""
    for layer in batchnorm_layers(model):
        layer.synchronized = True


def set_switches(model: tf_keras.Model, *, quantize: bool | None = None,
                 freeze: bool | None = None, layers: list[QuantBatchNorm] | None = None) -> None:
    """Flip the BN switches in place: no rebuild, no retrace. Freezing also makes the layers
    `freezable`: graphs traced from then on read the freeze switch (one traced before, with
    `freezable` off, keeps normalizing with batch statistics)."""
    for layer in layers if layers is not None else batchnorm_layers(model):
        if quantize is not None:
            layer.quant_switch.assign(int(quantize))
        if freeze is not None:
            layer.freeze_switch.assign(int(freeze))
            layer.freezable = layer.freezable or bool(freeze)


CUSTOM_OBJECTS = {"QuantBatchNorm": QuantBatchNorm, "ChannelAffine": ChannelAffine,
                  "ScalarArithmetic": ScalarArithmetic}
