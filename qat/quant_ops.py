"""Pure fake-quantization math: weight-like tensors on their own range, and activations.

BN parameters and folded kernels are weights: their range is known exactly from their current
values, so no min/max variables are kept (unlike activations, whose range is estimated over
batches by tfmot-style quantizers). Every element of such a tensor lies inside its own range, so
their straight-through gradient is the identity, range ends included (TF's FakeQuant gradient
would cut an end that the range nudge moves outside).

Two number formats for per-channel parameter vectors (see `quantized_vectors`):
  * `channel_exponent`: each value its own power-of-two exponent and a `num_bits` signed
    mantissa — a block floating point format with one-element blocks, the multiplier + shift
    pair integer requantization stores per output channel. Relative error <= 1/(2^(b-1)-1)
    (0.79 % at 8 bits) for every value, whatever the other channels hold.
  * `tensor`: one linear grid per vector — unsigned [0, max] for a non-negative vector, symmetric
    signed otherwise — as a fixed-point unit with one scale per BN tensor stores it.
"""

from __future__ import annotations

import tensorflow as tf

RANGE_FLOOR = 1e-6  # a learned range never collapses below this width
SMALLEST_NORMAL = 2.0**-126  # float32's (TF flushes subnormals to zero on CPU)
MANTISSA_MASK = 0x007FFFFF  # a float32's 23 mantissa bits
EXPONENT_MASK = 0x7F800000  # and its 8 exponent bits


def depthwise_output_channels(kernel):
    """A kh×kw×C×M depthwise kernel as kh×kw×1×(C·M): the last axis is then the output channel,
    as in TFLite's 1×kh×kw×(C·M) layout. Works on tensors and NumPy arrays alike."""
    kh, kw, c, m = kernel.shape
    return tf.reshape(kernel, (kh, kw, 1, c * m))


def int8_kernel_levels(bits: int) -> int:
    """The int8 level a b-bit symmetric kernel's extent is stored at: 127 at 8 bits; below, the
    b-bit top level 2^(b-1) - 1 times f = 127 // (2^(b-1) - 1) (126 at 4 bits), so the file's
    int8 grid is f times finer than the b-bit one and holds its points exactly."""
    if bits >= 8:
        return 127
    levels = 2 ** (bits - 1) - 1
    return levels * (127 // levels)


def usable_range(lo, hi, relu: bool = False):
    """An activation range as the fake-quant uses it: a trained range may drift past zero or
    collapse, so [min(lo, 0), at least RANGE_FLOOR above]. A no-op for EMA ranges; the export
    copies ranges through it too."""
    low = tf.zeros([]) if relu else tf.minimum(lo, 0.0)
    return low, tf.maximum(hi, low + RANGE_FLOOR)


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


def straight_through(x: tf.Tensor, quantized: tf.Tensor) -> tf.Tensor:
    """`quantized` forward, identity gradient to every element of `x`."""
    return x + tf.stop_gradient(quantized - x)


# Below this many elements TF's own per-channel op is the faster (`fake_quant_per_channel`).
PER_CHANNEL_OP_MAX_SIZE = 4096


def fake_quant_per_channel(x: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor, *, num_bits: int,
                           narrow_range: bool, own_symmetric_range: bool = False) -> tf.Tensor:
    """TF's FakeQuantWithMinMaxVarsPerChannel over the last axis, the same values bit for bit
    (tested), written as broadcast elementwise ops for tensors of PER_CHANNEL_OP_MAX_SIZE or more.

    Why: TF's kernel loops over the channels, each a strided view of the tensor, and is slow on
    large kernels (one CPU thread, per call: 3×3×512×512, 27.3 ms where these ops take 4.4 ms
    and the per-tensor op 0.7 ms; 1×1×112×1280, 0.70 vs 0.22 ms), which made a ResNet50 quant
    step 1.64x its float step (`make bench`). Below the threshold the one op wins (1×1×96×24:
    6.8 vs 13.6 µs).
    The arithmetic is the kernel's (`Nudge` in TF's fake_quant_ops_functor.h): step and inverse
    step from the range, zero point rounded half away from zero, clamp, then
    floor((x - nlo)·inv - quant_zero + 0.5)·step, in that order; a [0, 0] channel gives zeros.
    `own_symmetric_range`: [lo, hi] = [-max|x|, max|x|] per channel and `narrow_range`, as a
    kernel's training range. The zero point is then exactly the middle level, the nudged ends
    are ±max|x| to within two float roundings, and the clamp changes no result (the ends still
    floor to the end levels: tested), so its two passes are skipped.
    """
    size = x.shape.num_elements()
    if size is not None and size < PER_CHANNEL_OP_MAX_SIZE:
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(
            x, lo, hi, num_bits=num_bits, narrow_range=narrow_range)
    qmin = 1.0 if narrow_range else 0.0
    levels = 2.0**num_bits - 1.0 - qmin
    empty = tf.equal(hi - lo, 0.0)  # a [0, 0] channel: its step becomes 0, its values 0
    width = tf.where(empty, 1.0, hi - lo)
    step, inv_step = width / levels, levels / width
    zero_from_min = qmin - lo / step
    whole = tf.floor(zero_from_min)
    zero = tf.clip_by_value(tf.where(zero_from_min - whole >= 0.5, whole + 1.0, whole),
                            qmin, qmin + levels)
    step = tf.where(empty, 0.0, step)
    nlo, nhi = (qmin - zero) * step, (qmin + levels - zero) * step
    quant_zero = tf.floor(-nlo * inv_step + 0.5)
    clamped = x if own_symmetric_range else tf.maximum(tf.minimum(x, nhi), nlo)
    return tf.floor((clamped - nlo) * inv_step - quant_zero + 0.5) * step


def fake_quant(x: tf.Tensor, *, num_bits: int, symmetric: bool = True, per_channel: bool = False,
               narrow_range: bool = True) -> tf.Tensor:
    """Fake-quantize `x` on a grid spanning its own values (TF's FakeQuant rounding)."""
    lo, hi = value_range(tf.stop_gradient(x), symmetric=symmetric, per_channel=per_channel,
                         num_bits=num_bits, narrow_range=narrow_range)
    if per_channel and x.shape.rank >= 1:
        quantized = fake_quant_per_channel(x, lo, hi, num_bits=num_bits,
                                           narrow_range=narrow_range)
    else:
        quantized = tf.quantization.fake_quant_with_min_max_vars(
            x, lo, hi, num_bits=num_bits, narrow_range=narrow_range)
    return straight_through(x, quantized)


def fake_quant_own_symmetric_range(x: tf.Tensor, extent: tf.Tensor, *, num_bits: int,
                                   per_channel: bool) -> tf.Tensor:
    """TF's narrow-range FakeQuant on [-extent, extent], the tensor's own max|x| (per last-axis
    channel or not), identity gradient to `x` and none to the range: every value lies inside.
    One op on the tape instead of x + stop_gradient(q - x)'s two passes over `x`."""
    @tf.custom_gradient
    def quantize(x, extent):
        if per_channel:
            y = fake_quant_per_channel(x, -extent, extent, num_bits=num_bits, narrow_range=True,
                                       own_symmetric_range=True)
        else:
            y = tf.quantization.fake_quant_with_min_max_vars(x, -extent, extent,
                                                             num_bits=num_bits, narrow_range=True)
        return y, lambda dy: (dy, None)

    return quantize(x, extent)


def _round_to_steps(x: tf.Tensor, step: tf.Tensor, qmin: tf.Tensor, qmax: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(tf.round(x / step), qmin, qmax) * step


def channel_exponent_grid(x: tf.Tensor, num_bits: int) -> tf.Tensor:
    """Each element rounded to a `num_bits` signed mantissa times its own power of two.

    The exponent is the smallest that keeps |x| / 2^e <= 2^(b-1)-1, so |x| spans more than half
    the mantissa's levels: relative error <= 1/(2^(b-1)-1) (0.79 % at 8 bits). Zero stays zero.
    2^e is read off the float's bits (the exponent field, one up where any mantissa bit is set):
    exact, where a float log2 lands one exponent off at powers of two, and in fewer ops.
    """
    qmax = 2.0 ** (num_bits - 1) - 1.0
    # A floor keeps a zero's step positive (it then rounds to 0); |x| below qmax·2^-126 (1.5e-36
    # at 8 bits) rounds on that 2^-126 step.
    bound = tf.maximum(tf.abs(x) / qmax, SMALLEST_NORMAL)
    bits = tf.bitcast(bound, tf.int32)
    step = tf.bitcast(tf.bitwise.bitwise_and(bits + MANTISSA_MASK, EXPONENT_MASK), tf.float32)
    # |x| / step <= qmax (to within a rounding of |x| / qmax): round needs no clip.
    return tf.round(x / step) * step


def tensor_grid(x: tf.Tensor, num_bits: int) -> tf.Tensor:
    """Each column of a C×k `x` on one linear grid: unsigned if the column is >= 0, else
    symmetric (2^(b-1)-1 levels each side). A positive quantity keeps its sign bit for range."""
    unsigned = tf.reduce_min(x, axis=0) >= 0.0
    qmax = tf.where(unsigned, 2.0**num_bits - 1.0, 2.0 ** (num_bits - 1) - 1.0)
    qmin = tf.where(unsigned, 0.0, -qmax)
    step = tf.maximum(tf.reduce_max(tf.abs(x), axis=0) / qmax, 1e-30)
    return _round_to_steps(x, step, qmin, qmax)


PARAMETER_FORMATS = {"channel_exponent": channel_exponent_grid, "tensor": tensor_grid}


def quantized_vectors(vectors: list[tf.Tensor], num_bits: int, fmt: str) -> list[tf.Tensor]:
    """Per-channel parameter vectors (C values each) on their `fmt` grid. Forward only: the
    caller adds the difference to the float values behind a stop_gradient (qat.layers).

    Stacked as C×k columns so every format is one short chain of ops for all k vectors.
    """
    stacked = tf.stack(vectors, axis=-1)
    return tf.unstack(PARAMETER_FORMATS[fmt](stacked, num_bits), axis=-1)


def nudged_range(lo: tf.Tensor, hi: tf.Tensor, num_bits: int,
                 narrow_range: bool = False) -> tuple[tf.Tensor, tf.Tensor]:
    """The range FakeQuant really uses: [lo, hi] shifted so that zero is a grid point."""
    qmin, qmax = (1.0 if narrow_range else 0.0), 2.0**num_bits - 1.0
    scale = (hi - lo) / (qmax - qmin)
    zero = tf.clip_by_value(tf.round(qmin - lo / scale), qmin, qmax)
    return (qmin - zero) * scale, (qmax - zero) * scale


def fake_quant_on_int8_grid(x: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor,
                            num_bits: int) -> tf.Tensor:
    """A `num_bits` (< 8) activation FakeQuant as an int8 file can hold it: an 8-bit FakeQuant
    with the same step and zero point (its range runs on past `hi` to 256 levels), then a clamp
    at the grid's top. The same values as the `num_bits` FakeQuant (tested). Given the
    `num_bits` FakeQuant itself, the TFLite converter types the tensor int4, which its int8
    kernels reject; this way the tensor is int8, takes 2^num_bits levels, and the clamp is a
    MINIMUM op in the file (the bottom needs none: it is int8's own -128). A last 8-bit
    FakeQuant (the identity on these values) gives the MINIMUM's output its own scale in the
    file: without it the converter took the scale of a Concatenate the tensor also feeds, and
    every other layer reading it read that requantized copy (agreement 0.936 on the export
    test's net at 4 bits; 1.000 with it)."""
    nlo, nhi = nudged_range(tf.convert_to_tensor(lo), tf.convert_to_tensor(hi), num_bits)
    step = (nhi - nlo) / (2.0**num_bits - 1.0)
    top = nlo + 255.0 * step
    wide = tf.quantization.fake_quant_with_min_max_vars(x, nlo, top, num_bits=8)
    return tf.quantization.fake_quant_with_min_max_vars(tf.minimum(wide, nhi), nlo, top,
                                                        num_bits=8)


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
            # Relu6Grad passes dy where 0 < f < 6: map the range, widened a hair so the batch
            # maximum (and, unless this is the ReLU, the low end) counts as inside, onto (0, 6).
            if relu:  # one op before Relu6Grad; x = 0 is cut, as by ReLU's own gradient. A
                # range from 0 needs no nudge (zero is its first grid point): its top is `hi`
                # to within a float rounding, far inside the 1e-6 widening.
                features = x * (6.0 / (hi * (1.0 + 1e-6)))
            else:
                nlo, nhi = nudged_range(lo, hi, num_bits)
                pad = (nhi - nlo) * 1e-6
                features = (x - (nlo - pad)) * (6.0 / (nhi - nlo + 2.0 * pad))
            return tf.raw_ops.Relu6Grad(gradients=dy, features=features), None, None

        return y, grad

    return quantize(x, lo, hi)


LSQ_LEVELS = 15.0  # learned_fake_quant: above this many positive levels, g shrinks by 15/Qp


def learned_fake_quant(x: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor, num_bits: int, *,
                       narrow_range: bool = False, per_channel: bool = False,
                       fixed_low: bool = False, replicas: int = 1) -> tf.Tensor:
    """FakeQuant on a *trained* range [lo, hi], with LSQ's gradients (Esser et al. 2020; LSQ+
    for the offset, Bhalgat et al. 2020).

    Forward is TF's FakeQuant: TFLite's rounding on the range nudged so zero is a grid point.
    Backward works on that same nudged grid, with n steps of size s and u = (x - lo')/s:
      * x: straight through inside the range, 0 outside (clipped values get no gradient);
      * the step s (LSQ): round(u) - u inside (the rounding error LSQ keeps), n above, 0 below;
      * the offset, the range moving whole at a fixed step (LSQ+): 1 outside, 0 inside;
      * both scaled by LSQ's g = 1/sqrt(N·Qp) (N values in the tensor, whether it has one range
        or one per channel; Qp positive levels), times 15/Qp where Qp > 15 (`LSQ_LEVELS`:
        8-bit ranges otherwise jump under SGD).
    The (offset, step) updates are returned in the variables' coordinates: lo gets the offset's,
    hi the offset's plus n times the step's, so a plain optimizer step on (lo, hi) moves the
    range as LSQ+ moves (offset, step). `fixed_low`: lo is not trained (a ReLU's 0), hi gets the
    step's only. Symmetric ranges (lo = -t, hi = t) get d/dt = n × the step's gradient.
    `per_channel`: `lo`, `hi` hold one value per last-axis channel (weights). `replicas`: how
    many replicas each hold a share of `x` (activations under tf.distribute): N counts the
    global batch's values, so the summed gradient is the one-replica one.
    """
    levels = 2.0**num_bits - (2.0 if narrow_range else 1.0)
    axes = list(range(x.shape.rank - 1)) if per_channel else None

    @tf.custom_gradient
    def quantize(x, lo, hi):
        if per_channel:
            y = fake_quant_per_channel(x, lo, hi, num_bits=num_bits, narrow_range=narrow_range)
        else:
            y = tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=num_bits,
                                                             narrow_range=narrow_range)

        def grad(dy):
            low, high = nudged_range(lo, hi, num_bits, narrow_range)
            step = (high - low) / levels
            u = (x - low) / step
            below, above = u < 0.0, u > levels
            inside = tf.logical_not(tf.logical_or(below, above))
            d_u = tf.where(inside, tf.round(u) - u, tf.where(above, levels, 0.0))
            # N: every value of the tensor, per-channel ranges included (LSQ's N_W, the
            # layer's weight count). Counted per channel, a stem conv's 9 weights gave g a
            # clip term large enough to carry its ranges below zero in one SGD step (README).
            count = tf.cast(tf.size(x), tf.float32) * replicas
            positive = levels / 2.0 if narrow_range else levels  # symmetric: half the grid
            # Above LSQ_LEVELS positive levels, g shrinks by LSQ_LEVELS / Qp: a clipped value adds
            # Qp to dL/ds and the range is Qp·s, so the clip term moves the range by ~Qp^1.5/√N
            # of itself per value, ~70x more at 8 bits than at 4 (README, "Learned ranges").
            g = tf.math.rsqrt(count * positive) * min(1.0, LSQ_LEVELS / positive)
            d_step = tf.reduce_sum(dy * d_u, axis=axes) * g
            d_offset = (tf.zeros_like(d_step) if fixed_low else
                        tf.reduce_sum(dy * tf.cast(tf.logical_not(inside), x.dtype), axis=axes) * g)
            return dy * tf.cast(inside, x.dtype), d_offset, d_offset + levels * d_step

        return y, grad

    return quantize(x, lo, hi)
