"""Simulated PTQ (`qat.ptq`): calibration sets activation ranges from data and nothing else."""

import numpy as np
import tf_keras

from qat.api import prepare
from qat.config import QuantConfig
from qat.layers import batchnorm_layers
from qat.ptq import calibrate, simulated_ptq_model
from qat.quantize import activation_quantizers, quantize_model


def _dense_model(kernel, bias):
    inputs = tf_keras.Input((kernel.shape[0],))
    dense = tf_keras.layers.Dense(kernel.shape[1], name="dense")
    model = tf_keras.Model(inputs, dense(inputs))
    dense.set_weights([kernel, bias])
    return model


def test_calibration_averages_the_batch_extents():
    """A kernel on its own 8-bit grid and inputs on the input grid: the fake-quantized model
    computes x @ W + b exactly, so the calibrated output range is known in closed form."""
    rng = np.random.default_rng(0)
    kernel = (rng.integers(-127, 128, (6, 4)) / 127.0).astype(np.float32)
    kernel[0, 0] = 1.0  # max |W| = 1: the grid step is 1/127
    bias = rng.normal(0, 0.5, 4).astype(np.float32)
    qmodel = quantize_model(_dense_model(kernel, bias), QuantConfig(input_range=[0.0, 1.0]))
    batches = [(rng.integers(0, 256, (8, 6)) / 255.0).astype(np.float32) for _ in range(3)]

    assert calibrate(qmodel, batches) == 3
    outputs = [x @ kernel + bias for x in batches]
    want_lo = np.mean([min(out.min(), 0.0) for out in outputs])
    want_hi = np.mean([max(out.max(), 0.0) for out in outputs])
    wrapper = qmodel.get_layer("quant_dense")
    got = wrapper._output_quantizer_vars
    np.testing.assert_allclose([got["min_var"].numpy(), got["max_var"].numpy()],
                               [want_lo, want_hi], rtol=1e-5)
    # The mean, not the first batch (what one EMA step of 0.99 would keep) nor the last.
    assert not np.isclose(want_hi, max(outputs[0].max(), 0.0))
    assert all(q.ema_decay == 0.99 for q in activation_quantizers(qmodel))  # restored


def test_calibration_changes_no_weight_and_no_batchnorm_statistic():
    tf_keras.utils.set_random_seed(0)
    inputs = tf_keras.Input((8, 8, 3))
    x = tf_keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)  # named: Keras'
    # default names count up across the tests a worker has run
    x = tf_keras.layers.ReLU()(tf_keras.layers.BatchNormalization()(x))
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    model = prepare(tf_keras.Model(inputs, tf_keras.layers.Dense(3)(x)))
    rng = np.random.default_rng(1)
    calibration = rng.uniform(0, 1, (24, 8, 8, 3)).astype(np.float32)
    for bits in (8, 4):
        qmodel = simulated_ptq_model(model, QuantConfig(weight_bits=bits, activation_bits=bits,
                                                        ends_8_bits=False),
                                     calibration, batch_size=8)
        (bn,) = batchnorm_layers(qmodel)
        (float_bn,) = batchnorm_layers(model)
        for name in ("moving_mean", "moving_variance", "gamma", "beta"):
            np.testing.assert_array_equal(getattr(bn, name).numpy(),
                                          getattr(float_bn, name).numpy())
        assert int(bn.freeze_switch.numpy()) == 0  # frozen for calibration only
        ((kernel, _, _),) = qmodel.get_layer("quant_conv")._weight_vars  # the variable
        np.testing.assert_array_equal(kernel.numpy(), model.get_layer("conv").kernel.numpy())
        ranges = [q for q in activation_quantizers(qmodel) if q.fixed_range is None]
        assert ranges and all(q.num_bits == bits for q in ranges)
