"""Pure fake-quantization math for tensors whose range is their own value range.

BN parameters and folded kernels are weights: their range is known exactly from their current
values, so no min/max variables are kept (unlike activations, whose range is estimated over
batches by tfmot-style quantizers). The rounding itself is TensorFlow's FakeQuant op, the op the
TFLite converter understands, with its straight-through gradient.
"""

from __future__ import annotations

import tensorflow as tf


def value_range(x: tf.Tensor, *, symmetric: bool, per_channel: bool, num_bits: int,
                narrow_range: bool) -> tuple[tf.Tensor, tf.Tensor]:
    """Min/max that cover `x`; per channel means per last-axis index. Zero is always inside."""
    axes = list(range(x.shape.rank - 1)) if per_channel else None
    lo = tf.reduce_min(x, axis=axes)
    hi = tf.reduce_max(x, axis=axes)
    if symmetric:
        # tfmot's convention (quant_ops.LastValueQuantize): narrow range is exactly [-m, m];
        # a wide range has one extra negative level, so the two ends keep that ratio.
        ratio = 1.0 if narrow_range else (2.0**num_bits - 2.0) / 2.0**num_bits
        lo, hi = tf.minimum(lo, -hi / ratio), tf.maximum(hi, -lo * ratio)
    else:
        lo, hi = tf.minimum(lo, 0.0), tf.maximum(hi, 0.0)
    # A constant-zero tensor has an empty range; FakeQuant needs min < max.
    hi = tf.maximum(hi, lo + 1e-8)
    return lo, hi


def fake_quant(x: tf.Tensor, *, num_bits: int, symmetric: bool = True, per_channel: bool = False,
               narrow_range: bool = True) -> tf.Tensor:
    """Fake-quantize `x` on a grid spanning its own values; gradient is straight-through."""
    lo, hi = value_range(tf.stop_gradient(x), symmetric=symmetric, per_channel=per_channel,
                         num_bits=num_bits, narrow_range=narrow_range)
    if per_channel and x.shape.rank >= 1:
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(
            x, lo, hi, num_bits=num_bits, narrow_range=narrow_range)
    return tf.quantization.fake_quant_with_min_max_vars(
        x, lo, hi, num_bits=num_bits, narrow_range=narrow_range)


def nudged_range(lo: tf.Tensor, hi: tf.Tensor, num_bits: int,
                 narrow_range: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
    """The range FakeQuant really uses: [lo, hi] shifted so that zero is a grid point."""
    qmin, qmax = (1.0 if narrow_range else 0.0), 2.0**num_bits - 1.0
    scale = (hi - lo) / (qmax - qmin)
    zero = tf.clip_by_value(tf.round(qmin - lo / scale), qmin, qmax)
    return (qmin - zero) * scale, (qmax - zero) * scale


def fake_quant_activation(x: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor, num_bits: int,
                          relu: bool = False) -> tf.Tensor:
    """TensorFlow's FakeQuantWithMinMaxVars with a leaner straight-through gradient.

    Forward is the op itself. Backward passes the gradient where x lies inside the nudged range,
    as TF's gradient does, but skips the backprops TF also computes for min and max (two more
    passes over the tensor): activation ranges are EMA statistics, never trained.

    `relu`: the range starts at 0 (`lo` must be 0) and this op *is* the ReLU in front of it:
    FakeQuant maps every negative input to 0, and the gradient is cut at x <= 0 as ReLU's is, so
    relu → fake-quant costs one forward and one backward pass instead of two of each.
    """
    lo, hi = tf.convert_to_tensor(lo), tf.convert_to_tensor(hi)

    @tf.custom_gradient
    def quantize(x, lo, hi):
        y = tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=num_bits)

        def grad(dy):
            nlo, nhi = nudged_range(lo, hi, num_bits)
            # Relu6Grad passes dy where 0 < f < 6: map the range, widened a hair so the batch
            # maximum (and, unless this is the ReLU, the low end) counts as inside, onto (0, 6).
            pad = (nhi - nlo) * 1e-6
            if relu:  # one op before Relu6Grad; x = 0 is cut, as by ReLU's own gradient
                features = x * (6.0 / (nhi + pad))
            else:
                features = (x - (nlo - pad)) * (6.0 / (nhi - nlo + 2.0 * pad))
            return tf.raw_ops.Relu6Grad(gradients=dy, features=features), None, None

        return y, grad

    return quantize(x, lo, hi)
