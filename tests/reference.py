"""NumPy references for qat's arithmetic, written independently of TensorFlow."""

from __future__ import annotations

import numpy as np


def fake_quant(x, lo, hi, num_bits: int, narrow_range: bool):
    """TensorFlow's FakeQuantWithMinMaxVars, in float32 like its kernel: nudge the range so zero
    is exactly representable, clamp, round half up."""
    f32 = np.float32
    x = np.asarray(x, f32)
    lo = np.broadcast_to(np.asarray(lo, f32), x.shape[-1:])
    hi = np.broadcast_to(np.asarray(hi, f32), x.shape[-1:])
    qmin, qmax = f32(1 if narrow_range else 0), f32(2**num_bits - 1)
    scale = (hi - lo) / (qmax - qmin)
    zero_from_min = qmin - lo / scale
    zero = np.where(zero_from_min < qmin, qmin,
                    np.where(zero_from_min > qmax, qmax, np.round(zero_from_min + f32(1e-30))))
    zero = np.where(zero_from_min - np.floor(zero_from_min) == f32(0.5),
                    np.floor(zero_from_min) + 1, zero)
    nlo, nhi = (qmin - zero) * scale, (qmax - zero) * scale
    clamped = np.clip(x, nlo, nhi)
    inv = f32(1.0) / scale
    return (np.floor((clamped - nlo) * inv + f32(0.5)) * scale + nlo).astype(f32)


def fake_quant_own_range(x, num_bits: int, symmetric: bool = True, per_channel: bool = False):
    """qat.quant_ops.fake_quant: the range is the tensor's own (narrow range when symmetric)."""
    x = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - 1)) if per_channel else None
    lo, hi = x.min(axis=axes), x.max(axis=axes)
    if symmetric:
        bound = np.maximum(hi, -lo)
        lo, hi = -bound, bound
    else:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    hi = np.maximum(hi, lo + 1e-8)
    return fake_quant(x, lo, hi, num_bits, narrow_range=symmetric)


def batchnorm(x, gamma, beta, mean, variance, eps):
    return (x - mean) / np.sqrt(variance + eps) * gamma + beta


def batch_moments(x):
    """Per-channel mean and (biased) variance over every axis but the last."""
    flat = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    return flat.mean(0), flat.var(0)


def moving_update(moving, batch_value, momentum):
    return momentum * moving + (1.0 - momentum) * batch_value


def channel_exponent_grid(x, num_bits: int):
    """qat.quant_ops.channel_exponent_grid: a signed b-bit mantissa and a power-of-two exponent
    per value, the smallest exponent with |x| / 2^e <= 2^(b-1) - 1; round half to even."""
    x = np.asarray(x, np.float64)
    qmax = 2.0 ** (num_bits - 1) - 1.0
    magnitude = np.abs(x)
    safe = np.where(magnitude > 0, magnitude, 1.0)
    step = 2.0 ** np.ceil(np.log2(safe / qmax))
    return np.where(magnitude > 0, np.clip(np.round(x / step), -qmax, qmax) * step, 0.0)


def tensor_grid(x, num_bits: int):
    """qat.quant_ops.tensor_grid for one vector: unsigned grid if x >= 0, else symmetric."""
    x = np.asarray(x, np.float64)
    unsigned = x.min() >= 0
    qmax = 2.0**num_bits - 1.0 if unsigned else 2.0 ** (num_bits - 1) - 1.0
    step = max(np.abs(x).max() / qmax, 1e-30)
    return np.clip(np.round(x / step), 0.0 if unsigned else -qmax, qmax) * step


def quantized_batchnorm_params(gamma, beta, mean, variance, eps, *, bits: int, target: str,
                               fmt: str, variance_term: str = "inv_std"):
    """(gamma, beta, mean, variance) the fused kernel receives in quantized mode, per target."""
    q = {"channel_exponent": channel_exponent_grid, "tensor": tensor_grid}[fmt]
    q_ = lambda v: q(v, bits)  # noqa: E731
    if target == "affine":
        std = np.sqrt(variance + eps)
        multiplier = q_(gamma / std)
        offset = q_(beta - mean * gamma / std)
        return multiplier * std, offset + multiplier * mean, mean, variance
    if variance_term == "variance":
        v_q = np.maximum(q_(variance), 0.0)
    else:
        v_q = 1.0 / q_(1.0 / np.sqrt(variance + eps)) ** 2 - eps
    return q_(gamma), q_(beta), q_(mean), v_q
