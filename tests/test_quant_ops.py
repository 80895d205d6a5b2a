"""qat.quant_ops against the NumPy reference of TensorFlow's FakeQuant arithmetic."""

import numpy as np
import pytest
import tensorflow as tf

from qat.quant_ops import (
    PER_CHANNEL_OP_MAX_SIZE,
    channel_exponent_grid,
    fake_quant,
    fake_quant_activation,
    fake_quant_per_channel,
    nudged_range,
    value_range,
)
from tests import reference


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
def test_fake_quant_matches_reference(bits, symmetric, per_channel):
    x = np.random.default_rng(bits).normal(0.3, 1.5, size=(3, 3, 4, 6)).astype(np.float32)
    got = fake_quant(tf.constant(x), num_bits=bits, symmetric=symmetric,
                     per_channel=per_channel, narrow_range=symmetric).numpy()
    want = reference.fake_quant_own_range(x, bits, symmetric, per_channel)
    np.testing.assert_allclose(got, want, atol=1e-6)
    levels = np.unique(got if not per_channel else got[..., 0])
    assert len(levels) <= 2**bits


@pytest.mark.parametrize("bits", [4, 8])
def test_channel_exponent_grid_matches_reference_at_binade_edges(bits):
    """The exponent read off the float's bits, against float64 log2: random values, zeros,
    exact qmax·2^k (where a float32 log2 may land one exponent off) and their neighbours."""
    qmax = 2.0 ** (bits - 1) - 1.0
    edges = qmax * 2.0 ** np.arange(-20, 21, dtype=np.float64)
    x = np.concatenate([
        np.random.default_rng(bits).normal(0, 3, 2000), np.zeros(3), edges, -edges,
        np.nextafter(edges.astype(np.float32), np.float32(np.inf)),
        np.nextafter(edges.astype(np.float32), np.float32(0)),
        [1e-30, -2.5e-20, 3e30]]).astype(np.float32)
    got = channel_exponent_grid(tf.constant(x), bits).numpy()
    np.testing.assert_array_equal(got, reference.channel_exponent_grid(x, bits).astype(np.float32))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("narrow_range", [True, False])
@pytest.mark.parametrize("ranges", ["own_symmetric", "asymmetric"])
def test_per_channel_fake_quant_is_tensorflows_op_bit_for_bit(bits, narrow_range, ranges):
    """The broadcast form (large tensors) against TF's per-channel op, on values spanning six
    decades, ranges that clip and ranges that are the tensor's own extent, a zero channel."""
    rng = np.random.default_rng(bits)
    channels = 96
    x = rng.normal(size=(3, 3, 16, channels)) * 10.0 ** rng.uniform(-4, 2, channels)
    x[..., 5] = 0.0
    x = x.astype(np.float32)
    assert x.size >= PER_CHANNEL_OP_MAX_SIZE  # the broadcast form, not TF's op
    if ranges == "own_symmetric":
        hi = np.abs(x).max(axis=(0, 1, 2))
        lo = -hi
    else:  # the nudge moves the zero point; values past either end are clamped
        lo = x.min(axis=(0, 1, 2)) * rng.uniform(0.3, 1.2, channels)
        hi = x.max(axis=(0, 1, 2)) * rng.uniform(0.3, 1.2, channels)
        # a zero point of exactly 2.5 steps: TF rounds it half away from zero (3), not to even
        qmin = 1.0 if narrow_range else 0.0
        lo[1] = qmin - 2.5
        hi[1] = lo[1] + 2.0**bits - 1.0 - qmin
        lo[2] = hi[2] = 0.0  # TF zeroes a [0, 0] channel, whatever it holds
    lo, hi = lo.astype(np.float32), hi.astype(np.float32)
    want = tf.quantization.fake_quant_with_min_max_vars_per_channel(
        x, lo, hi, num_bits=bits, narrow_range=narrow_range).numpy()
    got = fake_quant_per_channel(tf.constant(x), tf.constant(lo), tf.constant(hi),
                                 num_bits=bits, narrow_range=narrow_range).numpy()
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got[..., 0])) > 2  # the values were quantized, not zeroed
    assert np.isfinite(got).all()
    if ranges == "own_symmetric" and narrow_range:  # a kernel's training range: no clamp needed
        unclamped = fake_quant_per_channel(tf.constant(x), tf.constant(lo), tf.constant(hi),
                                           num_bits=bits, narrow_range=True,
                                           own_symmetric_range=True).numpy()
        np.testing.assert_array_equal(unclamped, want)


def test_symmetric_range_is_symmetric_and_covers_values():
    x = tf.constant([-0.5, 0.1, 2.0])
    lo, hi = value_range(x, symmetric=True, per_channel=False, num_bits=8, narrow_range=True)
    assert float(lo) == pytest.approx(-2.0) and float(hi) == pytest.approx(2.0)


def test_straight_through_gradient():
    x = tf.constant(np.linspace(-1, 1, 11, dtype=np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(3.0 * fake_quant(x, num_bits=4))
    np.testing.assert_allclose(tape.gradient(y, x).numpy(), 3.0)


@pytest.mark.parametrize("lo, hi", [(0.0, 3.0), (-1.3, 2.2), (-0.7, 0.0)])
def test_activation_fake_quant_matches_tensorflow_forward_and_input_gradient(lo, hi):
    rng = np.random.default_rng(0)
    x = rng.uniform(lo - 1.0, hi + 1.0, size=(4, 5, 5, 3)).astype(np.float32)
    nlo, nhi = (float(v) for v in nudged_range(tf.constant(lo), tf.constant(hi), 8))
    x.flat[:4] = [nlo, nhi, 0.0, (nlo + nhi) / 2]  # the range ends and zero exactly
    x = tf.constant(x)
    upstream = tf.constant(rng.normal(size=x.shape).astype(np.float32))
    results = []
    for fn in (fake_quant_activation, lambda v, a, b, num_bits:
               tf.quantization.fake_quant_with_min_max_vars(v, a, b, num_bits=num_bits)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x, tf.constant(lo), tf.constant(hi), num_bits=8)
            loss = tf.reduce_sum(y * upstream)
        results.append((y.numpy(), tape.gradient(loss, x).numpy()))
    (ours_y, ours_g), (tf_y, tf_g) = results
    np.testing.assert_array_equal(ours_y, tf_y)
    np.testing.assert_array_equal(ours_g, tf_g)
    assert 0 < np.count_nonzero(ours_g) < ours_g.size  # inside passes, outside is cut


def test_relu_fake_quant_is_relu_then_fake_quant_forward_and_backward():
    """With `relu=True` the op replaces ReLU → FakeQuant: same values and input gradient,
    including at 0, at the range end and for negative inputs."""
    rng = np.random.default_rng(1)
    hi = 2.5
    x = rng.uniform(-2.0, hi + 1.0, size=(4, 6, 6, 3)).astype(np.float32)
    x.flat[:4] = [0.0, hi, -1e-7, hi / 2]
    x = tf.constant(x)
    upstream = tf.constant(rng.normal(size=x.shape).astype(np.float32))
    fused = lambda v: fake_quant_activation(v, 0.0, hi, num_bits=8, relu=True)  # noqa: E731
    unfused = lambda v: tf.quantization.fake_quant_with_min_max_vars(  # noqa: E731
        tf.nn.relu(v), 0.0, hi, num_bits=8)
    results = []
    for fn in (fused, unfused):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(fn(x) * upstream)
        results.append((fn(x).numpy(), tape.gradient(loss, x).numpy()))
    (ours_y, ours_g), (tf_y, tf_g) = results
    np.testing.assert_array_equal(ours_y, tf_y)
    np.testing.assert_array_equal(ours_g, tf_g)
    assert ours_y.min() == 0.0 and 0 < np.count_nonzero(ours_g) < ours_g.size


@pytest.mark.parametrize("lo, hi, bits", [(0.0, 4.47, 4), (-1.3, 2.1, 4), (-0.7, 0.2, 3),
                                          (0.0, 1.0, 2), (-2.0, 5.0, 6)])
def test_low_bit_fake_quant_on_an_int8_grid_is_the_low_bit_fake_quant(lo, hi, bits):
    """What the export converts for a 4-bit activation (an 8-bit FakeQuant with the 4-bit step,
    clamped at the 4-bit top) computes exactly the 4-bit FakeQuant QAT trained with."""
    from qat.quant_ops import fake_quant_on_int8_grid

    x = tf.constant(np.random.default_rng(bits).uniform(lo - 1, hi + 1, 20000).astype(np.float32))
    want = tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=bits).numpy()
    got = fake_quant_on_int8_grid(x, lo, hi, bits).numpy()
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) == 2**bits
