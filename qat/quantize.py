"""Quantization on tfmot: quantizers, QuantizeConfigs, a scheme, the plan, `quantize_model`.

What each layer kind is in the int8 graph is the rule table in `qat.rules`; this module turns
it into tfmot configs for one model, given each layer's neighbours. Placement follows what the
int8 file will compute (TFLite fuses conv+BN+ReLU into one op):
  * conv / depthwise kernels: tfmot's LastValueQuantizer (with a straight-through gradient),
    symmetric per output channel
    (depthwise kernels are reshaped so "channel" means output channel, not depth multiplier);
    dense kernels per tensor, as in tfmot's default scheme: TFLite stores FC weights as out×in,
    and the converter rejects a per-channel FakeQuant on Keras' in×out kernel ("tfl.transpose
    op has mismatched quantized axes");
  * no fake-quant between a conv and the BN folded into it, nor in front of a RELU/RELU6 that
    TFLite fuses into the op before it;
  * one activation fake-quant wherever the int8 graph has a tensor (`check_plan` verifies it
    before training); a ReLU fused into the op before it is computed by its fake-quant (range
    pinned at 0; a ReLU6's top kept <= 6, under EMA ranges only), as the int8 op's output range
    computes it (`FusedReLU`); any other ReLU stays a layer, a RELU op of the int8 graph
    (`relu_fuses`);
  * BN's own gamma, beta, mean and variance: inside qat's BN layer, behind its switch
    (`quant.bn=params`), or folded into the preceding kernel's quantizer (`quant.bn=fold`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import weakref
from collections.abc import Iterator

import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras
from tensorflow_model_optimization.python.core.quantization.keras import utils as tfmot_utils
from tensorflow_model_optimization.python.core.quantization.keras.quantize_layer import (
    QuantizeLayer,  # not exported by tfmot's public API, but what its own input transform adds
)

from qat.bias_grid import bias_rounding
from qat.config import LayerOverride, QuantConfig
from qat.distribute import replicas_in_sync
from qat.errors import ConfigError
from qat.graph import consumers, producers
from qat.layers import CUSTOM_OBJECTS, QuantBatchNorm
from qat.quant_ops import (
    RANGE_FLOOR,
    depthwise_output_channels,
    fake_quant,
    fake_quant_activation,
    fake_quant_on_int8_grid,
    fake_quant_own_symmetric_range,
    fake_quant_per_channel,
    learned_fake_quant,
    straight_through,
    usable_range,
)
from qat.rules import (
    FUSES_RELU,
    LAYER_RULES,
    PASS,
    RELU,
    is_fusable_relu,
    known_kinds,
    output_starts_at_zero,
    relu_cap,
    rule_for,
)

tfq = tfmot.quantization.keras
# A BN directly after one of these (with a linear activation) folds into it.
LINEAR_KERNELS = {kind: LAYER_RULES[kind].kernel[0] for kind in
                  ("Conv2D", "DepthwiseConv2D", "Dense")}
# A kernel quantizer kind and its `quant.bn=fold` form (the BN's scale inside its grid).
FOLDED_KERNELS = {"per_channel": "folded", "depthwise": "folded_depthwise",
                  "per_tensor": "folded_per_tensor"}
UNFOLDED_KERNELS = {folded: kind for kind, folded in FOLDED_KERNELS.items()}
# Quantizer range variables start where tfmot starts them; the first batch overwrites them.
INITIAL_RANGE = 6.0
FOLD_SCALE_FLOOR = 1e-8  # |gamma/sigma| below this would blow up W*s/s; treat as this small
MIN_RATIO = 1e-3  # a learned kernel range keeps at least this fraction of the kernel's extent


def global_extent(low, high):
    """(min, max) of a batch split across replicas: the global batch's, as on one replica.
    ReduceOp has no MIN/MAX, so the replicas' pairs are gathered (2 floats each) and reduced."""
    if replicas_in_sync() == 1:
        return low, high
    pair = tf.stack([-tf.convert_to_tensor(low, tf.float32),
                     tf.convert_to_tensor(high, tf.float32)])
    pairs = tf.distribute.get_replica_context().all_gather(pair[None], axis=0)
    extent = tf.reduce_max(pairs, axis=0)
    return -extent[0], extent[1]


# -- quantizers -------------------------------------------------------------------------------
class ActivationQuantizer(tfq.quantizers.Quantizer):
    """Asymmetric per-tensor activation fake-quant with EMA ranges, seeded by the first batch.

    tfmot's MovingAverageQuantizer starts every range at [-6, 6] and averages with decay 0.999,
    so a fine-tune of a few hundred steps keeps most of that arbitrary start. Here the first
    training batch sets the range and `ema_decay` (configurable) smooths from there on.
    `relu` pins the low end at 0, so the quantizer is also the ReLU (see `FusedReLU`), and skips
    the pass that finds the batch minimum. `cap` (6 for a ReLU6) keeps the range's top at most
    there, so the quantizer is a ReLU6 as well.
    """

    def __init__(self, num_bits: int = 8, ema_decay: float = 0.99, relu: bool = False,
                 fixed_range: tuple[float, float] | None = None, learned: bool = False,
                 cap: float | None = None):
        self.num_bits = int(num_bits)
        self.ema_decay = float(ema_decay)
        self.relu = bool(relu)
        self.cap = None if cap is None else float(cap)
        # quant.range=learned: the first batch sets the range, the optimizer trains it from then
        # on with LSQ's gradients (qat.quant_ops.learned_fake_quant) instead of averaging it.
        self.learned = bool(learned) and fixed_range is None
        # A known range (images in [0, 1]) is kept as is, never averaged: with 8 bits it makes
        # the int8 input exactly pixel - 128, and a uint8 input exactly the raw pixel.
        self.fixed_range = tuple(map(float, fixed_range)) if fixed_range else None
        # Set on the model the export converts (`store_low_bits_as_int8`), never in training.
        self.int8_storage = False
        # Inference adds the int8 file's bias rounding (qat.bias_grid); off on the model the
        # converter reads, whose biases the converter rounds itself. Read when a graph is
        # traced: set it before the model's first predict/evaluate/conversion.
        self.file_bias = True
        self._wrapper = None

    def build(self, tensor_shape, name, layer):
        constant = tf_keras.initializers.Constant
        # Under tf.distribute every replica assigns the same global-batch value (global_extent):
        # MEAN keeps it, whatever the replica count.
        mean = tf.VariableAggregation.MEAN
        self._wrapper = weakref.ref(layer)
        low, high = self.fixed_range or (0.0 if self.relu else -INITIAL_RANGE, INITIAL_RANGE)
        return {
            "min_var": layer.add_weight(f"{name}_min", initializer=constant(low),
                                        trainable=self.learned and not self.relu,
                                        aggregation=mean),
            "max_var": layer.add_weight(f"{name}_max", initializer=constant(high),
                                        trainable=self.learned, aggregation=mean),
            "seen": layer.add_weight(f"{name}_seen", initializer="zeros", trainable=False,
                                     aggregation=mean),
        }

    def __call__(self, inputs, training, weights, **kwargs):
        lo, hi = weights["min_var"], weights["max_var"]
        if training and self.learned:
            return self._learned(inputs, weights)
        if training and self.fixed_range is None:
            batch_lo, batch_hi = self._batch_extent(inputs)
            keep = self.ema_decay * weights["seen"]  # 0 on the first batch: take it as is
            # A ReLU's low end is 0 from the start and stays there: no update to run.
            new_lo = 0.0 if self.relu else keep * lo + (1.0 - keep) * batch_lo
            new_hi = keep * hi + (1.0 - keep) * batch_hi
            # FakeQuant takes the new range as computed, not read back after the assigns.
            stored = [hi.assign(new_hi, read_value=False),
                      weights["seen"].assign(1.0, read_value=False)]
            if not self.relu:
                stored.append(lo.assign(new_lo, read_value=False))
            with tf.control_dependencies(stored):
                return fake_quant_activation(inputs, new_lo, new_hi, self.num_bits,
                                             relu=self.relu)
        if self.learned:
            lo, hi = usable_range(lo, hi, self.relu)
        if not training:
            inputs = self._with_file_bias(inputs)
        if self.int8_storage and self.num_bits < 8:
            return fake_quant_on_int8_grid(inputs, lo, hi, self.num_bits)
        return tf.quantization.fake_quant_with_min_max_vars(inputs, lo, hi,
                                                            num_bits=self.num_bits)

    def _with_file_bias(self, inputs):
        """`inputs` plus the bias rounding of the int8 op this quantizer closes, if any."""
        wrapper = self._wrapper() if self._wrapper is not None else None
        rounding = bias_rounding(wrapper) if self.file_bias and wrapper is not None else None
        return inputs if rounding is None else inputs + rounding

    def _batch_extent(self, inputs):
        """[min(batch, 0), max(batch, 0)] of the global batch (the low end 0 for a ReLU)."""
        batch_lo = 0.0 if self.relu else tf.minimum(tf.reduce_min(inputs), 0.0)
        batch_hi = tf.maximum(tf.reduce_max(inputs), 0.0)
        if self.cap is not None:
            batch_hi = tf.minimum(batch_hi, self.cap)
        return global_extent(batch_lo, batch_hi)

    def _learned(self, inputs, weights):
        """The range starts where the EMA would, at the first batch's extent, then trains."""
        lo, hi, seen = weights["min_var"], weights["max_var"], weights["seen"]
        replicas = replicas_in_sync()
        if replicas == 1:
            def first_batch():
                batch_lo, batch_hi = self._batch_extent(inputs)
                return tf.group(lo.assign(batch_lo), hi.assign(batch_hi), seen.assign(1.0))

            init = tf.cond(tf.equal(seen, 0.0), first_batch, tf.no_op)
        else:  # replicas cannot synchronize (gather, or assign a mirrored variable) in a tf.cond:
            # the global extent every step, kept only on the first
            batch_lo, batch_hi = self._batch_extent(inputs)
            first = tf.equal(seen, 0.0)
            init = tf.group(lo.assign(tf.where(first, batch_lo, lo)),
                            hi.assign(tf.where(first, batch_hi, hi)), seen.assign(1.0))
        with tf.control_dependencies([init]):
            low, high = usable_range(tf.identity(lo), tf.identity(hi), self.relu)
        return learned_fake_quant(inputs, low, high, self.num_bits, fixed_low=self.relu,
                                  replicas=replicas)

    def get_config(self) -> dict:
        return {"num_bits": self.num_bits, "ema_decay": self.ema_decay, "relu": self.relu,
                "fixed_range": self.fixed_range, "learned": self.learned, "cap": self.cap}

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self == other


class KernelQuantizer(tfq.quantizers.LastValueQuantizer):
    """tfmot's LastValueQuantizer (range = the kernel's own extent, stored for the converter)
    with a straight-through gradient while training.

    Every kernel value lies inside its own range, so the straight-through gradient is the
    identity. TF's FakeQuant gradient op also backprops to min and max, which nothing trains
    (~3 ms of a 52 ms MobileNetV2 α 0.35 step on one CPU thread, `make bench`), and its mask
    cuts a channel's extreme weight where the range nudge's rounding puts it just outside
    (3 of 1280 channels at 8 bits in a review probe): that weight now gets its gradient.
    A narrow symmetric range, as qat's kernels use, is [-max|k|, max|k|]: tfmot's min, max, a
    division, minimum and maximum give exactly that; here abs, max and a negation (each op costs
    ~2 µs of step on CPU, whatever its size). Per-channel ranges go through
    `fake_quant_per_channel` (TF's op, or the same values in broadcast ops where TF's op is slow
    on large kernels: with it a ResNet50 quant step was 1.64x its float step in `make bench`),
    in inference too, but not on the graph the converter reads (`for_converter`): it
    recognizes TF's op.
    A wide range (qat builds none; tfmot's arithmetic) keeps tfmot's path.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # True while the TFLite converter traces the model (`traced_for_the_converter`).
        self.for_converter = False

    def __call__(self, inputs, training, weights, **kwargs):
        if not training:
            if not self.per_axis or self.for_converter:
                return super().__call__(inputs, training, weights, **kwargs)
            return fake_quant_per_channel(inputs, weights["min_var"], weights["max_var"],
                                          num_bits=self.num_bits,
                                          narrow_range=self.narrow_range)
        if not (self.symmetric and self.narrow_range):
            quantized = super().__call__(inputs, training, weights, **kwargs)
            return straight_through(inputs, quantized)
        rank = inputs.shape.rank
        if self.per_axis and rank < 2:  # tfmot: a per-axis vector is its own range
            extent = tf.abs(inputs)
        else:
            axes = list(range(rank - 1)) if self.per_axis else None
            extent = tf.reduce_max(tf.abs(inputs), axis=axes)
        lo = -extent
        stored = [weights["min_var"].assign(lo, read_value=False),
                  weights["max_var"].assign(extent, read_value=False)]
        with tf.control_dependencies(stored):
            return fake_quant_own_symmetric_range(inputs, extent, num_bits=self.num_bits,
                                                  per_channel=self.per_axis)


class DepthwiseKernelQuantizer(KernelQuantizer):
    """tfmot's LastValueQuantizer with one range per output channel of a depthwise kernel.

    A depthwise kernel is kh×kw×C×M; tfmot's per-axis quantizer takes the last axis (M, usually
    1), i.e. one range for the whole layer, which breaks once BN is folded (tfmot #438). TFLite
    stores it as 1×kh×kw×(C·M), so ranges are per C·M, as here.
    """

    def build(self, tensor_shape, name, layer):
        channels = int(tensor_shape[-2]) * int(tensor_shape[-1])
        return self._add_range_weights(layer, name, self.per_axis, (channels,))

    def __call__(self, inputs, training, weights, **kwargs):
        flat = depthwise_output_channels(inputs)
        return tf.reshape(super().__call__(flat, training, weights, **kwargs), inputs.shape)


class FoldedKernelQuantizer(tfq.quantizers.Quantizer):
    """`quant.bn=fold`: quantize W·γ/√(σ²+ε) as int8 hardware stores it, then divide back.

    conv(x, fq(W·s)/s) = conv(x, fq(W·s))/s, so the BN that follows (batch statistics before the
    freeze, moving ones after) sees exactly the folded int8 layer's output, rescaled: PyTorch's
    ConvBn `_forward_approximate`, with the batch-statistics correction it implies. The BN is
    named in the config (`bn_name`) and found among the wrapper's consumers when the model runs,
    so a saved and reloaded QAT model finds it again; until the graph is wired (Keras' symbolic
    build) the kernel is quantized unscaled.
    """

    def __init__(self, num_bits: int = 8, depthwise: bool = False, per_channel: bool = True,
                 bn_name: str | None = None, learned: bool = False):
        self.num_bits = int(num_bits)
        self.depthwise = bool(depthwise)
        self.per_channel = bool(per_channel)
        self.bn_name = bn_name
        # quant.range=learned: the range is a trained fraction `ratio` (<= 1) of the (folded)
        # kernel's extent, per channel: scale-free, so folding BN scales it along.
        self.learned = bool(learned)
        self._wrapper = None

    def build(self, tensor_shape, name, layer):
        self._wrapper = weakref.ref(layer)
        if not self.learned:
            return {}
        channels = int(tensor_shape[-1]) * (int(tensor_shape[-2]) if self.depthwise else 1)
        shape = (channels,) if self.per_channel else ()
        # tfmot's QuantizeWrapperV2 lists the wrapped layer's weights first only if that layer
        # was built before the wrapper (quantize_apply), not when a saved model is rebuilt:
        # list them first here too, or an .h5 reload assigns the kernel to the ratio.
        for weight in getattr(layer, "layer", layer).trainable_weights:
            if not any(weight is known for known in layer._trainable_weights):
                layer._trainable_weights.append(weight)
        return {"ratio": layer.add_weight(f"{name}_ratio", shape=shape, initializer="ones",
                                          trainable=True)}

    @property
    def bn(self) -> QuantBatchNorm | None:
        """The BN this kernel folds into: the consumer of the wrapped layer named `bn_name`."""
        wrapper = self._wrapper() if self._wrapper is not None else None
        for consumer in consumers(wrapper) if wrapper is not None else []:
            inner = getattr(consumer, "layer", consumer)
            if inner.name == self.bn_name and isinstance(inner, QuantBatchNorm):
                return inner
        return None

    def __call__(self, inputs, training, weights, **kwargs):
        kernel = inputs
        shape = kernel.shape
        if self.depthwise:
            kernel = depthwise_output_channels(kernel)
        bn = self.bn
        if bn is None:
            scale = tf.ones(kernel.shape[-1:])
        else:
            # The BN's effective values: float in fold mode, fake-quantized when its switch is on.
            gamma, _, _, variance = bn.effective_params()
            scale = gamma * tf.math.rsqrt(variance + bn.epsilon)
            floor = tf.where(scale < 0, -FOLD_SCALE_FLOOR, FOLD_SCALE_FLOOR)
            scale = tf.where(tf.abs(scale) < FOLD_SCALE_FLOOR, floor, scale)
        scaled = kernel * scale
        if self.learned:
            axes = list(range(scaled.shape.rank - 1)) if self.per_channel else None
            extent = tf.stop_gradient(tf.reduce_max(tf.abs(scaled), axis=axes))
            # r <= 1: the grid's last point is then a kernel value (r × extent), so the
            # exported kernel's own extent is the trained range, with nothing else to carry.
            ratio = tf.clip_by_value(weights["ratio"], MIN_RATIO, 1.0)
            bound = ratio * tf.maximum(extent, RANGE_FLOOR)
            folded = learned_fake_quant(scaled, -bound, bound, self.num_bits, narrow_range=True,
                                        per_channel=self.per_channel)
        else:
            folded = fake_quant(scaled, num_bits=self.num_bits, symmetric=True,
                                per_channel=self.per_channel, narrow_range=True)
        return tf.reshape(folded / scale, shape)

    def get_config(self) -> dict:
        return {"num_bits": self.num_bits, "depthwise": self.depthwise,
                "per_channel": self.per_channel, "bn_name": self.bn_name,
                "learned": self.learned}


class FusedReLU(tf_keras.layers.Layer):
    """A ReLU or ReLU6 in the quant model, computed by the activation quantizer that wraps it.

    FakeQuant on a range pinned at 0 maps every negative input to 0 (and, with the range's top
    kept <= 6 by the quantizer's `cap`, every input above 6 to the top), and the quantizer's
    gradient is cut outside the range, so ReLU(6) → FakeQuant equals that FakeQuant alone,
    forward and backward (but for inputs within 1e-6 of the range's top), as TFLite's fused int8
    RELU/RELU6 is just the output range of the op before it. Dropping the separate ReLU saves a
    pass over the tensor forward and one backward. Identity on its own: only `quantize_model`
    creates it, always wrapped with a `relu` ActivationQuantizer, and only for a ReLU that fuses
    into its producer (`relu_fuses`): elsewhere the converter would see two FakeQuants in a row
    and drop the ReLU's.
    """

    def call(self, inputs):
        return inputs


def _computed_by_quantizer(layer, config: LayerQuantizeConfig, pairs: dict[str, str]) -> bool:
    """True when a ReLU becomes `FusedReLU`: it fuses into the op before it, and its output
    quantizer computes it. A ReLU6 only under an EMA range (kept <= 6 by `cap`); a trained one
    may grow past 6, so it keeps its layer. A ReLU without an output quantizer (skipped, or
    on its concatenation's range) keeps its layer too: FusedReLU is the identity without one."""
    if not (is_fusable_relu(layer) and relu_fuses(layer, pairs)):
        return False
    quantizer = config.output_quantizer
    return quantizer is not None and (relu_cap(layer) is None or not quantizer.learned)


# -- quantize configs -------------------------------------------------------------------------
class LayerQuantizeConfig(tfq.QuantizeConfig):
    """One config for every layer kind: an optional kernel quantizer, an optional output one.

    `kernel`: None (no weights), "per_channel", "per_tensor", "depthwise", or "folded",
    "folded_depthwise", "folded_per_tensor" (`quant.bn=fold`, with `bn_name` the BN folded in).
    `output_range`: the output grid TFLite fixes for the op (LOGISTIC, TANH...), kept as is.
    Built from plain values so it serializes through tfmot's clone-and-rebuild and through
    `.h5`/SavedModel saving without custom nested objects.
    """

    def __init__(self, kernel_attr: str | None = None, kernel: str | None = None,
                 weight_bits: int = 8, output_bits: int | None = None, ema_decay: float = 0.99,
                 relu: bool = False, bn_name: str | None = None, learned: bool = False,
                 output_range: tuple[float, float] | None = None, learned_max_bits: int = 8,
                 cap: float | None = None, concat_range: str | None = None,
                 skipped: bool = False):
        self.kernel_attr = kernel_attr
        self.kernel = kernel
        self.weight_bits = weight_bits
        self.output_bits = output_bits
        self.ema_decay = ema_decay
        self.relu = relu
        self.cap = cap  # a ReLU6's 6: the output range's top stays <= it
        self.bn_name = bn_name
        self.learned = learned  # quant.range=learned
        self.learned_max_bits = learned_max_bits  # ... for quantizers with at most these bits
        self.output_range = tuple(output_range) if output_range else None
        # The Concatenate whose range quantizes this output, which then has no quantizer here
        self.concat_range = concat_range
        self.skipped = skipped  # left in float by quant.layers (no quantizer either way)
        self.kernel_quantizer = _kernel_quantizer(kernel, weight_bits, bn_name,
                                                  learned and weight_bits <= learned_max_bits)
        self.output_quantizer = (
            ActivationQuantizer(output_bits, ema_decay, relu, fixed_range=self.output_range,
                                learned=learned and output_bits <= learned_max_bits, cap=cap)
            if output_bits is not None else None)

    def on_range_of(self, concat: str) -> LayerQuantizeConfig:
        """The same kernel quantization, the output on the range of the Concatenate `concat`."""
        return LayerQuantizeConfig(**{**self.get_config(), "output_bits": None, "relu": False,
                                      "cap": None, "concat_range": concat})

    def get_weights_and_quantizers(self, layer):
        if self.kernel_quantizer is None:
            return []
        return [(getattr(layer, self.kernel_attr), self.kernel_quantizer)]

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        if self.kernel_quantizer is not None:
            setattr(layer, self.kernel_attr, quantize_weights[0])

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [self.output_quantizer] if self.output_quantizer is not None else []

    def get_config(self) -> dict:
        return {"kernel_attr": self.kernel_attr, "kernel": self.kernel,
                "weight_bits": self.weight_bits, "output_bits": self.output_bits,
                "ema_decay": self.ema_decay, "relu": self.relu, "bn_name": self.bn_name,
                "learned": self.learned, "output_range": self.output_range,
                "learned_max_bits": self.learned_max_bits, "cap": self.cap,
                "concat_range": self.concat_range, "skipped": self.skipped}


def _kernel_quantizer(kind: str | None, bits: int, bn_name: str | None = None,
                      learned: bool = False):
    if kind is None:
        return None
    if learned:  # one quantizer for every kernel kind; unscaled (bn_name None) unless folded
        return FoldedKernelQuantizer(bits, depthwise=kind.endswith("depthwise"),
                                     per_channel=not kind.endswith("per_tensor"),
                                     bn_name=bn_name if kind.startswith("folded") else None,
                                     learned=True)
    if kind in ("per_channel", "per_tensor"):
        return KernelQuantizer(num_bits=bits, per_axis=kind == "per_channel", symmetric=True,
                               narrow_range=True)
    if kind == "depthwise":
        return DepthwiseKernelQuantizer(num_bits=bits, per_axis=True, symmetric=True,
                                        narrow_range=True)
    if kind in ("folded", "folded_depthwise", "folded_per_tensor"):
        return FoldedKernelQuantizer(bits, depthwise=kind == "folded_depthwise",
                                     per_channel=kind != "folded_per_tensor", bn_name=bn_name)
    raise ValueError(f"unknown kernel quantizer kind {kind!r}")


# -- scheme -----------------------------------------------------------------------------------
class _InputQuantize(tfq.default_8bit.default_8bit_transforms.InputLayerQuantize):
    """tfmot's input transform, with qat's activation quantizer and bit width."""

    def __init__(self, bits: int, ema_decay: float, input_range: tuple[float, float] | None):
        self.bits, self.ema_decay, self.input_range = bits, ema_decay, input_range

    def replacement(self, match_layer):
        layer = QuantizeLayer(ActivationQuantizer(self.bits, self.ema_decay,
                                                  fixed_range=self.input_range))
        config = tfmot_utils.serialize_layer(layer, use_legacy_format=True)
        config["name"] = layer.name
        return tfq.graph_transformations.transforms.LayerNode(config, input_layers=[match_layer])

    def custom_objects(self):
        return {"QuantizeLayer": QuantizeLayer,
                "ActivationQuantizer": ActivationQuantizer}


class _InputOnlyLayout(tfq.QuantizeLayoutTransform):
    """Every layer arrives annotated with its config, so the only rewrite is the input quantizer."""

    def __init__(self, bits: int, ema_decay: float, input_range: tuple[float, float] | None):
        self.transforms = [_InputQuantize(bits, ema_decay, input_range)]

    def apply(self, model, layer_quantize_map):
        return tfq.graph_transformations.model_transformer.ModelTransformer(
            model, self.transforms, set(layer_quantize_map), layer_quantize_map).transform()


class _AnnotatedOnlyRegistry(tfq.QuantizeRegistry):
    """qat annotates every layer explicitly; anything unannotated is left alone."""

    def get_quantize_config(self, layer):
        return None

    def supports(self, layer):
        return False


class QatQuantizeScheme(tfq.QuantizeScheme):
    def __init__(self, activation_bits: int, ema_decay: float,
                 input_range: tuple[float, float] | None = None):
        self.activation_bits, self.ema_decay = activation_bits, ema_decay
        self.input_range = input_range

    def get_layout_transformer(self):
        return _InputOnlyLayout(self.activation_bits, self.ema_decay, self.input_range)

    def get_quantize_registry(self):
        return _AnnotatedOnlyRegistry()


# -- graph analysis ---------------------------------------------------------------------------
def folding_pairs(model: tf_keras.Model) -> dict[str, str]:
    """{BN name: name of the conv/depthwise/dense it folds into} for BNs with such a producer."""
    pairs = {}
    for layer in model.layers:
        if isinstance(layer, QuantBatchNorm):
            inbound = producers(layer)
            if (len(inbound) == 1 and type(inbound[0]).__name__ in LINEAR_KERNELS
                    and len(consumers(inbound[0])) == 1
                    and inbound[0].get_config().get("activation", "linear") == "linear"):
                pairs[layer.name] = inbound[0].name
    return pairs


def fuses_into(producer, consumer, pairs: dict[str, str]) -> bool:
    """True when `producer`'s output is no tensor of the int8 graph: it feeds only `consumer`,
    which the converter merges into it (a BN folded into its conv, or a fusable ReLU)."""
    if consumers(producer) != [consumer]:
        return False
    if isinstance(consumer, QuantBatchNorm):
        return pairs.get(consumer.name) == producer.name
    return is_fusable_relu(consumer) and type(producer).__name__ in FUSES_RELU


def relu_fuses(layer, pairs: dict[str, str]) -> bool:
    """True when the ReLU `layer` is no op of the int8 graph: TFLite fuses it into the op before
    it (a conv, BN, add... whose output feeds only this ReLU). Any other ReLU (after an Add that
    also feeds a residual branch, as in Xception; after a concatenation or a pooling) is an op of
    its own and must stay one in the graph the converter sees: a lone FakeQuant pinned at 0 right
    after its input's FakeQuant is dropped by the converter (after ADD and CONCATENATION), so the
    negative values would pass on in the int8 file while the QAT model clamps them."""
    inbound = producers(layer)
    return len(inbound) == 1 and fuses_into(inbound[0], layer, pairs)


def feeds_only_a_concat(producer) -> bool:
    """True when `producer`'s output feeds nothing but one Concatenate (it may read it twice),
    on any axis but the batch's."""
    outbound = list({id(layer): layer for layer in consumers(producer)}.values())
    if len(outbound) != 1 or type(outbound[0]).__name__ != "Concatenate":
        return False
    concat = outbound[0]
    return concat.axis not in (0, -len(concat.output_shape))


def _share_concat_ranges(model: tf_keras.Model, configs: dict[str, LayerQuantizeConfig],
                         skipped: frozenset[str]) -> None:
    """Quantize a concatenation's inputs on its range where the int8 file does. TFLite's int8
    CONCATENATION takes its inputs on its output's scale, and the converter puts an input that
    feeds nothing else straight onto that scale (dropping any FakeQuant of its own): a range of
    its own rounded it twice and clamped it where the file does not (agreement 0.34 on the
    export test's net, 0.38 concatenated on the height axis). tfmot's ConcatTransform does the
    same. Not for an input that also feeds another layer, an output on TFLite's fixed grid (a
    LOGISTIC, say, at any bits) or of other bits than the concatenation's (8 bits into a 4-bit
    one): the file requantizes those for the concatenation alone, as QAT rounds them twice
    (`fake_quant_on_int8_grid` keeps the other layers on the input's own scale below 8 bits).
    Not for a Concatenate feeding one: each keeps its range, so the result does not depend on
    the order layers are visited."""
    for layer in model.layers:
        config = configs.get(layer.name)
        if (config is None or config.output_bits is None
                or getattr(rule_for(layer), "fixed_range", None)
                or layer.name in skipped or type(layer).__name__ == "Concatenate"
                or not feeds_only_a_concat(layer)):
            continue
        concat = consumers(layer)[0].name
        if configs[concat].output_bits == config.output_bits:
            configs[layer.name] = config.on_range_of(concat)


def _layer_config(layer, pairs: dict[str, str], cfg: QuantConfig,
                  override: LayerOverride | None = None) -> LayerQuantizeConfig:
    """Which quantizers a layer gets: its rule (qat.rules), given its neighbours and any
    `quant.layers` override."""
    override = override or LayerOverride()
    rule = rule_for(layer)
    if override.skip:
        return LayerQuantizeConfig(skipped=True)
    if rule is None and type(layer).__name__ == "TFOpLambda":  # tfmot cannot wrap one
        raise ConfigError(f"layer {layer.name} ({_describe(layer)}) is a TensorFlow op no "
                          "quantizer can wrap: run qat.prepare(model) first, which rewrites "
                          "arithmetic, sigmoid, tanh, relu, swish and spatial means as Keras "
                          f"layers, build it from a Keras layer, or leave it in float with "
                          f"quant.layers.{layer.name}.skip=true")
    if rule is None:
        raise ConfigError(f"layer {layer.name} ({_describe(layer)}) has no quantization rule: "
                          f"leave it in float with quant.layers.{layer.name}.skip=true, or "
                          f"build it from {', '.join(known_kinds())}")
    if rule.output == PASS:
        return LayerQuantizeConfig()
    activation_bits = override.activation_bits or cfg.activation_bits
    outbound = consumers(layer)
    fused_into_next = len(outbound) == 1 and fuses_into(layer, outbound[0], pairs)
    common = {"output_bits": None if fused_into_next else activation_bits,
              "ema_decay": cfg.activation_ema_decay, "learned": cfg.range == "learned",
              "learned_max_bits": cfg.learned_max_bits}
    if rule.output == RELU or type(layer).__name__ == "ReLU":
        common.update(output_bits=activation_bits, relu=output_starts_at_zero(layer),
                      cap=relu_cap(layer))
    if rule.fixed_range and common["output_bits"] == 8:  # below 8 bits the file requantizes
        common["output_range"] = rule.fixed_range  # from the fixed grid to the trained one
    if rule.kernel is None:
        return LayerQuantizeConfig(**common)
    attr, kernel = rule.kernel
    folded_bn = next((bn for bn, linear in pairs.items() if linear == layer.name), None)
    # A per-tensor grid does not survive folding (per-channel BN scales break it, tfmot #438),
    # so a dense kernel followed by BN is quantized folded in either mode.
    if folded_bn and (cfg.bn == "fold" or kernel == "per_tensor"):
        kernel = FOLDED_KERNELS[kernel]
    return LayerQuantizeConfig(attr, kernel, override.weight_bits or cfg.weight_bits,
                               bn_name=folded_bn, **common)


def _describe(layer) -> str:
    kind = type(layer).__name__
    if kind == "Activation":
        return f"Activation {layer.get_config()['activation']!r}"
    if kind == "TFOpLambda":
        return f"TFOpLambda tf.{layer.get_config()['function']}"
    return kind


def check_plan(model: tf_keras.Model, configs: dict[str, LayerQuantizeConfig],
               pairs: dict[str, str], skipped: frozenset[str] = frozenset()) -> None:
    """Every tensor the int8 graph will have must get a range in the QAT model.

    Walks the graph once: a layer's output has a range if it is quantized, or passes an input
    that has one through unchanged (pooling, reshape). Every input a layer reads must have a
    range, unless the producer fuses into it. Fails before training, naming the first gap,
    instead of failing at export after the whole quant phase. Layers the user `skipped` are
    float by choice: their inputs and outputs are not checked, nor the outputs of the layers
    that pass a skipped layer's output on (a reshape after it).
    """
    has_range: dict[str, bool] = {}
    chosen_float = set(skipped)
    for layer in model.layers:
        if isinstance(layer, tf_keras.layers.InputLayer):
            has_range[layer.name] = True  # the input quantizer
            continue
        passes = getattr(rule_for(layer), "output", None) == PASS
        if passes and producers(layer) and all(p.name in chosen_float
                                               for p in producers(layer)):
            chosen_float.add(layer.name)
        for producer in producers(layer):
            if not (has_range[producer.name] or fuses_into(producer, layer, pairs)
                    or getattr(configs.get(producer.name), "concat_range", None)
                    or producer.name in chosen_float or layer.name in skipped):
                raise ConfigError(
                    f"layer {layer.name} ({type(layer).__name__}) reads {producer.name} "
                    f"({type(producer).__name__}), whose output has no quantization range: the "
                    "int8 file could not compute it; add an output rule for "
                    f"{type(producer).__name__} in qat.quantize or leave it out of the model")
        config = configs[layer.name]
        has_range[layer.name] = config.output_bits is not None or (
            passes and all(has_range[p.name] for p in producers(layer)))


# -- the plan --------------------------------------------------------------------------------
def input_bits(cfg: QuantConfig) -> int:
    """The model input's bits: 8 below 8 bits with quant.ends_8_bits (images are 8-bit)."""
    return 8 if cfg.ends_8_bits and cfg.activation_bits < 8 else cfg.activation_bits


def _range_owner(layer):
    """The layer whose output range `layer` reads: up through PASS layers (which keep their
    input's range); None at the model input."""
    inbound = producers(layer)
    while len(inbound) == 1 and getattr(rule_for(inbound[0]), "output", None) == PASS:
        inbound = producers(inbound[0])
    if len(inbound) != 1 or isinstance(inbound[0], tf_keras.layers.InputLayer):
        return None
    return inbound[0]


def layer_overrides(model: tf_keras.Model, cfg: QuantConfig) -> dict[str, LayerOverride]:
    """`quant.layers` resolved per layer name; a pattern that matches no layer is an error."""
    resolved: dict[str, LayerOverride] = {}
    names = [layer.name for layer in model.layers
             if not isinstance(layer, tf_keras.layers.InputLayer)]
    if cfg.ends_8_bits and min(cfg.weight_bits, cfg.activation_bits) < 8:
        # LSQ's convention below 8 bits: the first and the last layer with a kernel (the stem
        # conv and the classifier) keep 8-bit weights and outputs; quant.layers may override.
        kernels = [layer for layer in model.layers
                   if getattr(rule_for(layer), "kernel", None) is not None]
        for layer in kernels[:1] + kernels[-1:]:
            resolved[layer.name] = LayerOverride(weight_bits=8, activation_bits=8)
        feeding = _range_owner(kernels[-1]) if kernels else None
        if feeding is not None:  # the classifier's input, as LSQ keeps it
            current = resolved.get(feeding.name, LayerOverride())
            resolved[feeding.name] = LayerOverride(weight_bits=current.weight_bits,
                                                   activation_bits=8)
    for pattern, override in cfg.layers.items():
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise ConfigError(f"quant.layers pattern {pattern!r} matches no layer of "
                              f"{model.name} (layers are named like {', '.join(names[:3])}, ...)")
        for name in matched:
            current = resolved.get(name, LayerOverride())
            resolved[name] = LayerOverride(
                weight_bits=override.weight_bits or current.weight_bits,
                activation_bits=override.activation_bits or current.activation_bits,
                skip=override.skip or current.skip)
    return resolved


def plan_layers(model: tf_keras.Model, cfg: QuantConfig):
    """(folding pairs, {layer: LayerQuantizeConfig}, skipped names), checked (`check_plan`)."""
    pairs = folding_pairs(model)
    overrides = layer_overrides(model, cfg)
    configs = {layer.name: _layer_config(layer, pairs, cfg, overrides.get(layer.name))
               for layer in model.layers if not isinstance(layer, tf_keras.layers.InputLayer)}
    skipped = frozenset(name for name, o in overrides.items() if o.skip)
    _share_concat_ranges(model, configs, skipped)
    check_plan(model, configs, pairs, skipped)
    return pairs, configs, skipped


def activation_quantizers(qmodel: tf_keras.Model) -> list[ActivationQuantizer]:
    """Every activation quantizer of a quantized model: the layers' outputs' and the input's."""
    quantizers = []
    for layer in qmodel.layers:
        quantizers += getattr(layer, "_output_quantizers", None) or []
        if isinstance(layer, QuantizeLayer):
            quantizers.append(layer.quantizer)
    return [q for q in quantizers if isinstance(q, ActivationQuantizer)]


def wrappers(qmodel: tf_keras.Model) -> dict[str, tfq.QuantizeWrapperV2]:
    """{wrapped layer's name: its tfmot wrapper} of a quantized model."""
    return {layer.layer.name: layer for layer in qmodel.layers
            if isinstance(layer, tfq.QuantizeWrapperV2)}


def kept_relus(qmodel: tf_keras.Model) -> frozenset[str]:
    """ReLUs TFLite could fuse that the QAT model kept as layers (a ReLU6 under a learned range,
    a skipped one): the model the export converts must keep them too, or a learned top past 6
    would pass values in (6, top] through the file that the QAT model clamps."""
    return frozenset(name for name, wrapper in wrappers(qmodel).items()
                     if is_fusable_relu(wrapper.layer))


@contextlib.contextmanager
def traced_for_the_converter(qmodel: tf_keras.Model) -> Iterator[None]:
    """While the TFLite converter traces `qmodel`: per-channel kernels through TF's own
    FakeQuantWithMinMaxVarsPerChannel, the op it reads ranges from (qat's broadcast form has the
    same values), and no int32 bias rounding (the converter rounds biases itself). The flags are
    read when a graph is traced and restored after, so the model still predicts as it trained."""
    kernels = [quantizer for wrapper in wrappers(qmodel).values()
               for _, quantizer, _ in wrapper._weight_vars
               if isinstance(quantizer, KernelQuantizer)]
    activations = activation_quantizers(qmodel)
    saved = [quantizer.file_bias for quantizer in activations]
    for quantizer in kernels:
        quantizer.for_converter = True
    for quantizer in activations:
        quantizer.file_bias = False
    try:
        yield
    finally:
        for quantizer in kernels:
            quantizer.for_converter = False
        for quantizer, file_bias in zip(activations, saved, strict=True):
            quantizer.file_bias = file_bias


def store_low_bits_as_int8(qmodel: tf_keras.Model) -> int:
    """Switch every activation quantizer below 8 bits of `qmodel` (the model the export converts)
    to its int8-storable form (`fake_quant_on_int8_grid`); returns how many. Before the model
    is traced for conversion: the flag is read when the graph is built."""
    low = [q for q in activation_quantizers(qmodel) if q.num_bits < 8]
    for quantizer in low:
        quantizer.int8_storage = True
    return len(low)


def quantization_plan(model: tf_keras.Model, cfg: QuantConfig) -> list[dict]:
    """Every layer, its kernel and output quantizer, bits and BN handling: `quant/plan.json`."""
    pairs, configs, skipped = plan_layers(model, cfg)
    folds_into = {linear: bn for bn, linear in pairs.items()}
    plan = []
    for layer in model.layers:
        if isinstance(layer, tf_keras.layers.InputLayer):
            plan.append({"layer": layer.name, "type": "InputLayer",
                         "output": f"int8 range ({input_bits(cfg)} bits)"})
            continue
        config, outbound = configs[layer.name], consumers(layer)
        if layer.name in skipped:
            output = "float (quant.layers skip)"
        elif config.output_range is not None:
            low, high = config.output_range
            output = f"TFLite's fixed int8 grid (step 1/{round(255 / (high - low))} from {low:g})"
        elif config.output_bits is not None:
            learned = config.output_quantizer.learned
            output = (f"int8 range ({config.output_bits} bits{', from 0' if config.relu else ''}"
                      f"{', learned' if learned else ''})")
        elif len(outbound) == 1 and fuses_into(layer, outbound[0], pairs):
            output = f"fused into {outbound[0].name}"
        elif config.concat_range is not None:
            output = f"the range of {config.concat_range} (a concatenation's input)"
        else:
            output = "its input's range"
        entry = {"layer": layer.name, "type": _describe(layer), "output": output}
        if config.kernel is not None:
            entry.update(kernel=config.kernel, weight_bits=config.weight_bits)
            if getattr(config.kernel_quantizer, "learned", False):
                entry["kernel_range"] = "learned"
        if layer.name in folds_into:
            entry["bn"] = f"{folds_into[layer.name]} folded in"
        if isinstance(layer, QuantBatchNorm):
            entry["bn"] = _bn_handling(layer.name, pairs, skipped, cfg)
        plan.append(entry)
    return plan


def _bn_handling(name: str, pairs: dict[str, str], skipped: frozenset[str],
                 cfg: QuantConfig) -> str:
    if name in skipped:
        return "float parameters (quant.layers skip)"
    where = f"folded into {pairs[name]}" if name in pairs else "a per-channel multiply-add"
    if cfg.bn == "fold" and name in pairs:
        return f"{where}; float parameters, quantized inside the folded kernel"
    return f"{where}; {cfg.bn_target} quantized, {cfg.bn_format} format, {cfg.bn_bits} bits"


# -- entry point ------------------------------------------------------------------------------
def quantize_scope():
    """Custom objects to build and load qat's quantized models (tfmot's scope + qat's)."""
    return tfq.quantize_scope({
        **CUSTOM_OBJECTS, "LayerQuantizeConfig": LayerQuantizeConfig,
        "ActivationQuantizer": ActivationQuantizer,
        "KernelQuantizer": KernelQuantizer, "DepthwiseKernelQuantizer": DepthwiseKernelQuantizer,
        "FoldedKernelQuantizer": FoldedKernelQuantizer, "FusedReLU": FusedReLU,
    })


def quantize_model(model: tf_keras.Model, cfg: QuantConfig | None = None,
                   keep_relus: frozenset[str] = frozenset(),
                   configs: dict[str, LayerQuantizeConfig] | None = None) -> tf_keras.Model:
    """tfmot-quantized copy of `model` (weights copied) with qat's BN switched on per `cfg.bn`.

    BNs that fold into a kernel in `fold` mode keep float parameters (the kernel quantizer carries
    their quantization); every other BN fake-quantizes its parameters (`cfg.bn_target`). The plan
    is checked first (`check_plan`): a model the int8 file could not compute fails here.
    `keep_relus`: ReLU layers that stay layers even where their quantizer could compute them
    (the export: every ReLU6 the QAT model kept, whose learned range may reach past 6).
    `configs`: a plan made elsewhere, one config per layer (the export's, read off the QAT
    model's own quantizers) instead of one resolved from `cfg`, which then sets only the input
    quantizer and the BN settings.
    """
    cfg = cfg or QuantConfig()
    if configs is None:
        pairs, configs, skipped = plan_layers(model, cfg)
    else:
        pairs = folding_pairs(model)
        skipped = frozenset(name for name, config in configs.items() if config.skipped)
        check_plan(model, configs, pairs, skipped)
    bn_overrides = {"bn_bits": cfg.bn_bits, "bn_target": cfg.bn_target,
                    "bn_format": cfg.bn_format, "bn_variance": cfg.bn_variance}

    def annotate(layer):
        if type(layer).__name__ in ("TFOpLambda", "SlicingOpLambda"):  # PASS ops, e.g. tf.reshape:
            return layer.__class__.from_config(layer.get_config())  # tfmot cannot wrap these
        config = layer.get_config()
        if isinstance(layer, QuantBatchNorm):
            config.update(bn_overrides)
        fused = (layer.name not in skipped | keep_relus
                 and _computed_by_quantizer(layer, configs[layer.name], pairs))
        clone = FusedReLU(name=layer.name) if fused else layer.__class__.from_config(config)
        return tfq.quantize_annotate_layer(clone, configs[layer.name])

    with quantize_scope():
        annotated = tf_keras.models.clone_model(model, clone_function=annotate)
        annotated.set_weights(model.get_weights())
        scheme = QatQuantizeScheme(input_bits(cfg), cfg.activation_ema_decay,
                                   tuple(cfg.input_range) if cfg.input_range else None)
        qmodel = tfq.quantize_apply(annotated, scheme)
    for name, wrapper in wrappers(qmodel).items():
        if not isinstance(wrapper.layer, QuantBatchNorm):
            continue
        float_params = (cfg.bn == "fold" and name in pairs) or name in skipped
        wrapper.layer.quant_switch.assign(0 if float_params else 1)
        wrapper.layer.freeze_switch.assign(0)
    return qmodel
