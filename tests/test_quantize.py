"""tfmot placement, bit widths, per-channel ranges, restore into the quant phase, fold mode."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras

from qat.config import ModelConfig, QuantConfig
from qat.fold import dequantized_float_model, fold_batchnorms
from qat.layers import batchnorm_layers
from qat.models import build_model
from qat.phases import restore_model
from qat.quantize import quantize_model

Wrapper = tfmot.quantization.keras.QuantizeWrapperV2


def _wrappers(qmodel):
    return {layer.layer.name: layer for layer in qmodel.layers if isinstance(layer, Wrapper)}


def _train_step(model, seed=0):
    """One training call so LastValue/EMA ranges reflect real values."""
    x = np.random.default_rng(seed).uniform(0, 1, (16, *model.input_shape[1:])).astype("float32")
    model(x, training=True)
    return x


def test_fake_quant_placement_matches_the_fused_int8_graph():
    model = build_model(ModelConfig(name="resnet", width=4), (8, 8, 1), 10)
    wrappers = _wrappers(quantize_model(model, QuantConfig()))
    outputs = {name: bool(w._output_quantizers) for name, w in wrappers.items()}
    for name in wrappers:
        if name.endswith(("_conv", "_dense")):
            assert not outputs[name], f"{name}: no fake-quant between a linear layer and its BN"
    assert not outputs["stem_bn"]  # BN -> ReLU: quantized once, after the ReLU
    assert outputs["stem_relu"] and outputs["logits"] and outputs["pool"]
    assert not outputs["res1_add"]  # Add -> ReLU is one fused op
    assert outputs["res1b_bn"]  # BN feeding an Add has a tensor of its own in the int8 graph


def test_plain_relus_are_computed_by_their_fake_quant():
    """A plain ReLU becomes FusedReLU (identity) under a quantizer pinned at 0; the quant model
    still computes ReLU → FakeQuant, i.e. no negative activation survives."""
    model = build_model(ModelConfig(name="resnet", width=4), (8, 8, 1), 10)
    qmodel = quantize_model(model, QuantConfig())
    relu = _wrappers(qmodel)["stem_relu"]
    assert type(relu.layer).__name__ == "FusedReLU"
    assert relu._output_quantizers[0].relu
    _train_step(qmodel)
    assert float(relu._output_quantizer_vars["min_var"].numpy()) == 0.0
    probe = tf_keras.Model(qmodel.input, relu.output)
    x = np.random.default_rng(1).normal(0, 1, (8, 8, 8, 1)).astype("float32")
    for training in (True, False):
        out = probe(x, training=training).numpy()
        assert out.min() == 0.0 and out.max() > 0.0


def test_leaky_and_capped_relus_keep_their_layer():
    inputs = tf_keras.Input((4, 4, 2))
    leaky = tf_keras.layers.ReLU(negative_slope=0.1, name="leaky")(inputs)
    capped = tf_keras.layers.ReLU(max_value=6.0, name="capped")(leaky)
    pooled = tf_keras.layers.GlobalAveragePooling2D(name="pool")(capped)
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(3, name="logits")(pooled))
    wrappers = _wrappers(quantize_model(model, QuantConfig()))
    assert type(wrappers["leaky"].layer).__name__ == "ReLU"
    assert not wrappers["leaky"]._output_quantizers[0].relu  # negative outputs keep a range
    assert type(wrappers["capped"].layer).__name__ == "ReLU"
    assert wrappers["capped"]._output_quantizers[0].relu


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_bits_and_per_channel_ranges(bits):
    model = build_model(ModelConfig(name="mobilenet", width=4), (8, 8, 1), 10)
    qmodel = quantize_model(model, QuantConfig(weight_bits=bits))
    _train_step(qmodel)
    wrappers = _wrappers(qmodel)
    dw = wrappers["dw1_depthwise"]
    weight, quantizer, qvars = dw._weight_vars[0]
    assert quantizer.num_bits == bits
    assert qvars["min_var"].shape == (4,)  # one range per output channel, not per multiplier
    q = quantizer(weight, False, qvars).numpy().reshape(-1, 4)
    for c in range(4):  # narrow symmetric grid: at most 2^bits - 1 levels per channel
        assert len(np.unique(np.round(q[:, c], 6))) <= 2**bits - 1


def test_quantize_copies_weights_and_switches_bn_on():
    model = build_model(ModelConfig(width=4), (8, 8, 1), 10)
    for bn in batchnorm_layers(model):
        bn.moving_mean.assign(np.full(bn.moving_mean.shape, 0.25, np.float32))
    qmodel = quantize_model(model, QuantConfig())
    qbns = batchnorm_layers(qmodel)
    assert qbns and all(int(bn.quant_switch.numpy()) == 1 for bn in qbns)
    assert all(np.allclose(bn.moving_mean.numpy(), 0.25) for bn in qbns)
    assert all(int(bn.quant_switch.numpy()) == 0 for bn in batchnorm_layers(model))


def test_float_checkpoint_restores_with_identical_float_outputs(tmp_path):
    cfg = ModelConfig(width=4)
    model = build_model(cfg, (8, 8, 1), 10)
    model.compile("adam", tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).uniform(0, 1, (64, 8, 8, 1)).astype("float32")
    model.fit(x, np.arange(64) % 10, epochs=2, verbose=0)
    tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    restored = build_model(cfg, (8, 8, 1), 10)
    restore_model(restored, str(tmp_path), "float")
    np.testing.assert_array_equal(model(x, training=False).numpy(),
                                  restored(x, training=False).numpy())


@pytest.mark.parametrize("mode", ["params", "fold"])
def test_folded_kernels_lie_on_the_simulated_int8_grid(mode):
    """The kernels the exporter writes are exactly the per-channel int8 values QAT simulated."""
    model = build_model(ModelConfig(width=4), (8, 8, 1), 10)
    qmodel = quantize_model(model, QuantConfig(bn=mode))
    for bn in batchnorm_layers(qmodel):
        rng = np.random.default_rng(7)
        bn.gamma.assign(rng.uniform(0.5, 2.0, bn.gamma.shape))
        bn.moving_variance.assign(rng.uniform(0.1, 3.0, bn.gamma.shape))
    _train_step(qmodel)
    folded = fold_batchnorms(dequantized_float_model(qmodel, build_model(ModelConfig(width=4),
                                                                         (8, 8, 1), 10)))
    kernel = folded.get_layer("block1b_conv").kernel.numpy().reshape(-1, 4)
    steps = np.abs(kernel).max(axis=0) / 127.0
    ints = kernel / steps
    np.testing.assert_allclose(ints, np.round(ints), atol=2e-3)


def test_dense_before_bn_is_quantized_folded_on_a_per_tensor_grid():
    """Dense kernels are per tensor (TFLite); that grid only survives if the folded kernel is
    what gets quantized, so in `params` mode too the dense quantizer sees W·γq/σq."""
    model = build_model(ModelConfig(width=4), (8, 8, 1), 10)
    qmodel = quantize_model(model, QuantConfig(bn="params", weight_bits=4))
    wrappers = _wrappers(qmodel)
    assert wrappers["fc_dense"].quantize_config.kernel_quantizer.bn is wrappers["fc_bn"].layer
    assert int(wrappers["fc_bn"].layer.quant_switch.numpy()) == 1
    bn = wrappers["fc_bn"].layer
    rng = np.random.default_rng(3)
    bn.gamma.assign(rng.uniform(0.2, 3.0, bn.gamma.shape))
    _train_step(qmodel)
    folded = fold_batchnorms(dequantized_float_model(qmodel, build_model(ModelConfig(width=4),
                                                                         (8, 8, 1), 10)))
    kernel = folded.get_layer("fc_dense").kernel.numpy()
    ints = kernel / (np.abs(kernel).max() / 7.0)  # 4-bit narrow symmetric: -7..7
    np.testing.assert_allclose(ints, np.round(ints), atol=2e-3)


def test_fold_mode_binds_kernel_quantizers_and_keeps_bn_params_float():
    model = build_model(ModelConfig(width=4), (8, 8, 1), 10)
    qmodel = quantize_model(model, QuantConfig(bn="fold"))
    wrappers = _wrappers(qmodel)
    quantizer = wrappers["block1a_conv"].quantize_config.kernel_quantizer
    assert quantizer.bn is wrappers["block1a_bn"].layer
    assert int(wrappers["block1a_bn"].layer.quant_switch.numpy()) == 0
