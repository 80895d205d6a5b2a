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
