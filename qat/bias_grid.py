"""The int8 file's int32 bias grid, computed by the QAT model at inference.

TFLite stores a conv/depthwise/dense bias as int32 on the grid input step × kernel step (per
output channel), so the file adds round(B/g)·g where the QAT model adds B: up to half a step g,
which the layer's output rounding turns into one-step flips. Measured on the digits convnet at
w4a8: those flips were nearly all of the file's difference from the QAT model (mean 0.19 output
steps at the logits; with the bias rounded, 0.003 against TFLite's default XNNPACK kernels).

`bias_rounding(wrapper)` returns, for the output quantizer of `wrapper`, the per-channel
difference round(B/g)·g − B of the int8 op it closes — a conv/depthwise/dense (its own ReLU or
ReLU6 included) and optionally the BN folded into it, or a BN with nothing to fold into (a 1×1
depthwise conv in the file, its multiplier an 8-bit kernel), then optionally a ReLU or ReLU6
that TFLite fuses — or None for any other layer. For a Concatenate's quantizer: the
differences of its inputs on its range, each over its part of the output (zeros for inputs
that keep a range of their own). A ReLU computed by its quantizer (`FusedReLU`: every plain
ReLU that fuses, but one on a concatenation's range, and ReLU6 under EMA ranges) gets the
difference before the quantizer's clamp, as the file adds it; after a ReLU layer it is added
to the clamped value: the same output, since it is below half an output step (it is a
fraction of the accumulator step g) and the clamp's ends 0 and 6 are grid points or the
range's ends. The layers are found through the Keras graph when the model runs (as
`FoldedKernelQuantizer` finds its BN), so a reloaded QAT model computes it too. Inference
only: training keeps its gradients as they were, and with batch statistics there is no file
to match.
"""

from __future__ import annotations

import tensorflow as tf

from qat.graph import consumers, producers
from qat.layers import QuantBatchNorm
from qat.quant_ops import (
    RANGE_FLOOR,
    depthwise_output_channels,
    int8_kernel_levels,
    nudged_range,
    usable_range,
)
from qat.rules import FUSED_ACTIVATIONS, PASS, is_fusable_relu, rule_for

LINEAR = ("Conv2D", "DepthwiseConv2D", "Dense")


def _inner(layer):
    return getattr(layer, "layer", layer)


def _single(layers: list):
    return layers[0] if len(layers) == 1 else None


def _fused_producer(layer):
    """The single producer of `layer` if it feeds nothing else and has no output range of its
    own: the converter merges it into `layer`'s op."""
    producer = _single(producers(layer))
    if producer is None or consumers(producer) != [layer] or \
            getattr(producer, "_output_quantizers", None):
        return None
    return producer


def _is_linear(layer) -> bool:
    inner = _inner(layer)
    return (type(inner).__name__ in LINEAR and bool(getattr(layer, "_weight_vars", None))
            # a ReLU/ReLU6 inside is fused into the op: the rounding after it gives the same
            and inner.get_config().get("activation") in (None, *FUSED_ACTIVATIONS))


def _op_group(wrapper):
    """(linear wrapper or None, BN wrapper or None) of the int8 op whose output `wrapper`
    quantizes: a linear layer with the BN folded into it, a linear layer alone, or a BN with
    nothing to fold into (the export's 1×1 depthwise conv); None for any other op."""
    last = wrapper
    if type(_inner(wrapper)).__name__ == "FusedReLU" or is_fusable_relu(_inner(wrapper)):
        last = _fused_producer(wrapper)
    if last is not None and isinstance(_inner(last), QuantBatchNorm):
        linear = _fused_producer(last)
        return (linear, last) if linear is not None and _is_linear(linear) else (None, last)
    return (last, None) if last is not None and _is_linear(last) else None


def _input_step(linear):
    """The step of the int8 tensor `linear` reads: its nearest producer with an output range,
    up through layers that pass their input's grid on (padding, max pooling, reshapes)."""
    layer = linear
    while True:
        layer = _single(producers(layer))
        if layer is None:
            return None
        quantizer = getattr(layer, "quantizer", None)  # tfmot's QuantizeLayer (model input)
        ranges = getattr(layer, "quantizer_vars", None)
        if quantizer is None:
            quantizers = getattr(layer, "_output_quantizers", None) or []
            quantizer = quantizers[0] if quantizers else None
            ranges = getattr(layer, "_output_quantizer_vars", None)
        if quantizer is not None:
            if not hasattr(quantizer, "relu") or not ranges or "max_var" not in ranges \
                    or quantizer.num_bits > 8:
                return None  # not qat's activation quantizer, or no int8 tensor in a file
            low, high = nudged_range(*usable_range(ranges["min_var"], ranges["max_var"],
                                                   quantizer.relu), quantizer.num_bits)
            return (high - low) / (2.0**quantizer.num_bits - 1.0)
        if getattr(rule_for(_inner(layer)), "output", None) != PASS:
            return None


def channel_extremes(kernel: tf.Tensor, channel_axes: int = 1) -> tf.Tensor:
    """Each output channel's largest and smallest value, as a kernel of the same rank whose
    first axis is 2 and whose other non-channel axes are 1 (`channel_axes`: 2 for a depthwise
    kernel's C×M). Every kernel quantizer maps a channel's values monotonically, with a range
    its extremes decide, so quantizing this stand-in gives the quantized kernel's extremes
    exactly (tested), at the cost of two reductions instead of quantizing the whole kernel
    again: the wrapper already did, and on ResNet50 the second time made inference 1.6x float."""
    axes = list(range(kernel.shape.rank - channel_axes))
    extremes = tf.stack([tf.reduce_max(kernel, axes), tf.reduce_min(kernel, axes)])
    return tf.reshape(extremes, [2] + [1] * (len(axes) - 1) + kernel.shape[-channel_axes:])


def _kernel_steps(linear, multiplier):
    """Per-output-channel step of the kernel the file stores: the quantized kernel (times the
    folded BN multiplier) over its extent, on the int8 grid that holds its bits (`qat.export`)."""
    weight, quantizer, qvars = linear._weight_vars[0]
    depthwise = type(_inner(linear)).__name__ == "DepthwiseConv2D"
    kernel = quantizer(channel_extremes(weight, 2 if depthwise else 1), False, qvars)
    if depthwise:
        kernel = depthwise_output_channels(kernel)
    kernel = tf.reshape(kernel, (-1, kernel.shape[-1]))
    if multiplier is not None:
        kernel = kernel * multiplier
    extent = tf.reduce_max(tf.abs(kernel), axis=0)
    if not getattr(quantizer, "per_channel", getattr(quantizer, "per_axis", True)):
        extent = tf.reduce_max(extent)
    if quantizer.num_bits > 8:
        return None  # a quant-only run: no file to match
    return tf.maximum(extent, RANGE_FLOOR) / int8_kernel_levels(quantizer.num_bits)


def _concatenated_rounding(concat) -> tf.Tensor | None:
    """A concatenation's quantizer closes the ops of the inputs on its range (their config's
    `concat_range`, qat.quantize): each one's per-channel rounding over its part of the output,
    zeros over the other inputs' parts; None where none has one. On the channel axis that is
    the vectors side by side; on another, a 1×…×L×…×C tensor that broadcasts over the batch
    (None where a part's length L is not known when the graph is built: no rounding then)."""
    inputs = producers(concat)  # none on the wrapper's first call, while the graph is built
    roundings = [bias_rounding(producer) if getattr(
        getattr(producer, "quantize_config", None), "concat_range", None) else None
        for producer in inputs]
    if all(rounding is None for rounding in roundings):
        return None
    rank = len(inputs[0].output_shape)
    axis = _inner(concat).axis % rank
    parts = []
    for producer, rounding in zip(inputs, roundings, strict=True):
        shape = [1] * rank
        shape[axis] = producer.output_shape[axis]
        shape[-1] = producer.output_shape[-1]
        if None in shape:
            return None
        parts.append(tf.zeros(shape) if rounding is None else
                     tf.broadcast_to(tf.reshape(rounding, [1] * (rank - 1) + [-1]), shape))
    return tf.concat(parts, axis=axis)


def bias_rounding(wrapper) -> tf.Tensor | None:
    """round(B/g)·g − B per output channel of the int8 op `wrapper`'s output quantizer closes
    (None when it closes no conv/depthwise/dense or lone BN, or the input grid is unknown)."""
    if type(_inner(wrapper)).__name__ == "Concatenate":
        return _concatenated_rounding(wrapper)
    group = _op_group(wrapper)
    if group is None:
        return None
    linear, bn = group
    input_step = _input_step(linear or bn)
    if input_step is None:
        return None
    bias = 0.0
    if linear is not None and getattr(_inner(linear), "use_bias", False):
        bias = _inner(linear).bias
    multiplier = None
    if bn is not None:
        layer = _inner(bn)
        gamma, beta, mean, variance = layer.effective_params()
        multiplier = gamma * tf.math.rsqrt(variance + layer.epsilon)
        bias = multiplier * (bias - mean) + beta
    if linear is None:  # the export stores the multiplier as an 8-bit 1×1 depthwise kernel
        kernel_steps = tf.maximum(tf.abs(multiplier), RANGE_FLOOR) / int8_kernel_levels(8)
    else:
        kernel_steps = _kernel_steps(linear, multiplier)
    if kernel_steps is None:
        return None
    step = input_step * kernel_steps
    return tf.stop_gradient((tf.round(bias / step) - bias / step) * step)
