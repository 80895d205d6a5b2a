"""BN re-estimation: moving statistics become the exact average of the quantized model's batch
statistics; nothing else changes."""

import numpy as np
import tf_keras

from qat.api import prepare
from qat.config import QuantConfig
from qat.layers import batchnorm_layers
from qat.quantize import quantize_model
from qat.reestimate import reestimate_bn_statistics


def _qmodel():
    tf_keras.utils.set_random_seed(0)
    inputs = tf_keras.Input((8, 8, 1))
    x = tf_keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    x = tf_keras.layers.BatchNormalization(name="bn")(x)
    x = tf_keras.layers.GlobalAveragePooling2D()(tf_keras.layers.ReLU()(x))
    model = prepare(tf_keras.Model(inputs, tf_keras.layers.Dense(3)(x)))
    # A fixed input range: the input quantizer is then the same in training and inference.
    return quantize_model(model, QuantConfig(input_range=[0.0, 1.0], weight_bits=4))


def test_moving_statistics_become_the_average_of_the_batch_statistics():
    qmodel = _qmodel()
    (bn,) = batchnorm_layers(qmodel)
    bn.freeze_switch.assign(1)  # a frozen BN is re-estimated too, and stays frozen
    rng = np.random.default_rng(0)
    images = [rng.uniform(0, 1, (16, 8, 8, 1)).astype(np.float32) * (i + 1) / 3
              for i in range(3)]
    before = {v.name: v.numpy().copy() for v in qmodel.variables}

    assert reestimate_bn_statistics(qmodel, images) == 3

    changed = {v.name for v in qmodel.variables
               if not np.array_equal(v.numpy(), before[v.name])}
    assert changed == {bn.moving_mean.name, bn.moving_variance.name}
    assert int(bn.freeze_switch.numpy()) == 1 and bn.momentum == 0.99

    # The BN's input, as training mode computes it (the kernel quantizer takes its range from
    # the weights there): per-batch channel moments, averaged over the batches.
    conv = tf_keras.Model(qmodel.inputs, qmodel.get_layer("quant_conv").output)
    stats = [conv(x, training=True).numpy().reshape(-1, 4) for x in images]
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.mean([s.mean(0) for s in stats], 0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(),  # the kernel's unbiased variance
                               np.mean([s.var(0, ddof=1) for s in stats], 0), rtol=1e-4)


def test_quant_phase_reestimates_before_its_last_checkpoint(tmp_path):
    """CLI: the re-estimated statistics are what the quant checkpoint (and the export) hold."""
    import tensorflow as tf

    from tests.conftest import run_cli

    common = ["data=synthetic", "data.image_size=8", "data.train_examples=128",
              "data.val_examples=64", "model.width=4", "trainer.epochs=1", "quant.epochs=1",
              "trainer.batch_size=32", "trainer.verbose=0"]
    proc = run_cli("qat.train", "phase=float", *common, f"run.dir={tmp_path / 'float_run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = {}
    for batches in (0, 3):  # both from one float checkpoint; the one that re-estimates exports
        run = tmp_path / f"run{batches}"
        proc = run_cli("qat.train", "phase=quant", *common, f"run.dir={run}",
                       f"quant.init_from={tmp_path / 'float_run' / 'float'}",
                       f"quant.bn_reestimate_batches={batches}",
                       f"export.enabled={str(bool(batches)).lower()}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        reader = tf.train.load_checkpoint(str(run / "quant"))
        stats[batches] = {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
                          if "moving_mean" in k}
    assert (tmp_path / "run3" / "export" / "report.json").is_file()
    assert stats[0].keys() == stats[3].keys() and stats[0]
    assert all(not np.allclose(stats[0][k], stats[3][k]) for k in stats[0])


def test_a_bn_folded_into_a_per_tensor_grid_keeps_its_variance_and_the_grid():
    """Dense → BN: the dense kernel is quantized folded on ONE grid, fq(W·γ/√(var+ε)), so the
    moving variance sets the grid step and which weights round to 0, i.e. the kernel the file
    holds. Re-estimation keeps that variance and measures the mean on that grid; re-estimating
    the variance too moved the grid after every batch, and the file used yet another one."""
    tf_keras.utils.set_random_seed(0)
    inputs = tf_keras.Input((16,))
    x = tf_keras.layers.Dense(8, use_bias=False, name="hidden")(inputs)
    x = tf_keras.layers.ReLU()(tf_keras.layers.BatchNormalization(name="bn")(x))
    model = prepare(tf_keras.Model(inputs, tf_keras.layers.Dense(3, name="logits")(x)))
    qmodel = quantize_model(model, QuantConfig(input_range=[0.0, 1.0], weight_bits=2,
                                               ends_8_bits=False))
    (bn,) = batchnorm_layers(qmodel)
    wrapper = qmodel.get_layer("quant_hidden")
    ((kernel, quantizer, qvars),) = wrapper._weight_vars
    assert quantizer.bn is bn and not quantizer.per_channel  # the folded per-tensor grid
    rng = np.random.default_rng(0)
    images = [rng.uniform(0, 1, (32, 16)).astype(np.float32) for _ in range(4)]
    variance = bn.moving_variance.numpy().copy()
    grid = quantizer(kernel, False, qvars).numpy()

    assert reestimate_bn_statistics(qmodel, images) == 4

    np.testing.assert_array_equal(bn.moving_variance.numpy(), variance)
    np.testing.assert_array_equal(quantizer(kernel, False, qvars).numpy(), grid)
    dense = tf_keras.Model(qmodel.inputs, wrapper.output)  # x·fq(W·s)/s on the kept grid
    means = [dense(x, training=True).numpy().mean(0) for x in images]
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.mean(means, 0), rtol=1e-5, atol=1e-6)
