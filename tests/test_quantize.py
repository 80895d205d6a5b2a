"""tfmot placement, bit widths, per-channel ranges, restore into the quant phase, fold mode."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras

from qat.config import ModelConfig, QuantConfig
from qat.fold import dequantized_float_model, fold_batchnorms
from qat.layers import QuantBatchNorm, batchnorm_layers
from qat.models import build_model
from qat.quant_ops import PER_CHANNEL_OP_MAX_SIZE
from qat.quantize import activation_quantizers, quantize_model
from qat.quantize import wrappers as _wrappers
from qat.runs import restore_model
from tests.conftest import conv_bn_relu6_net


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


def test_relus_that_do_not_fuse_keep_their_layer():
    """A ReLU whose producer cannot carry it (an Add that also feeds a residual branch, as in
    Xception; a concatenation) is a RELU op of its own in the int8 file, so it stays a layer:
    a lone FakeQuant pinned at 0 after its input's FakeQuant is dropped by the converter."""
    inputs = tf_keras.Input((4, 4, 2))
    stem = tf_keras.layers.Conv2D(4, 1, name="stem")(inputs)
    other = tf_keras.layers.Conv2D(4, 1, name="other")(inputs)
    added = tf_keras.layers.Add(name="add")([stem, other])  # read by the ReLU and by "cat"
    relu = tf_keras.layers.Activation("relu", name="add_relu")(added)
    branch = tf_keras.layers.Conv2D(4, 1, name="branch")(relu)
    merged = tf_keras.layers.Concatenate(name="cat")([branch, added])
    cat_relu = tf_keras.layers.ReLU(name="cat_relu")(merged)
    conv = tf_keras.layers.Conv2D(4, 1, name="conv")(cat_relu)
    fused = tf_keras.layers.ReLU(name="fused_relu")(conv)
    pooled = tf_keras.layers.GlobalAveragePooling2D(name="pool")(fused)
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(3, name="logits")(pooled))
    wrappers = _wrappers(quantize_model(model, QuantConfig()))
    assert type(wrappers["add_relu"].layer).__name__ == "Activation"
    assert type(wrappers["cat_relu"].layer).__name__ == "ReLU"
    assert type(wrappers["fused_relu"].layer).__name__ == "FusedReLU"  # conv → ReLU: one op
    for name in ("add_relu", "cat_relu", "fused_relu"):
        assert wrappers[name]._output_quantizers[0].relu


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


def test_a_fused_relu6_is_computed_by_its_fake_quant_forward_and_backward():
    """conv → BN → ReLU6 under an EMA range: the ReLU6 becomes FusedReLU, the quantizer's range
    stops at 6, and FakeQuant alone equals ReLU6 → FakeQuant in value and gradient (the
    quantizer cuts the gradient at the range's top as ReLU6 cuts it at 6)."""
    wrapper = _wrappers(quantize_model(conv_bn_relu6_net(), QuantConfig()))["relu6"]
    assert type(wrapper.layer).__name__ == "FusedReLU"
    quantizer = wrapper._output_quantizers[0]
    assert quantizer.relu and quantizer.cap == 6.0
    x = tf.constant(np.random.default_rng(0).uniform(-10, 10, (8, 4, 4, 4)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = wrapper(x, training=True)  # first batch: the range is the batch's, capped at 6
    grad = tape.gradient(y, x).numpy()
    ranges = wrapper._output_quantizer_vars
    assert float(ranges["min_var"].numpy()) == 0.0 and float(ranges["max_var"].numpy()) == 6.0
    expected = tf.quantization.fake_quant_with_min_max_vars(tf.nn.relu6(x), 0.0, 6.0).numpy()
    np.testing.assert_array_equal(y.numpy(), expected)
    np.testing.assert_array_equal(grad, ((x > 0) & (x < 6)).numpy().astype("float32"))
    for training in (True, False):  # later batches and inference clamp at the range's top
        assert float(tf.reduce_max(wrapper(x, training=training))) <= 6.0


def test_a_relu6_under_a_learned_range_keeps_its_layer():
    """A trained range may grow past 6, where FakeQuant alone would no longer clamp at 6."""
    wrapper = _wrappers(quantize_model(
        conv_bn_relu6_net(), QuantConfig(range="learned", learned_max_bits=8)))["relu6"]
    assert type(wrapper.layer).__name__ == "ReLU"
    assert wrapper._output_quantizers[0].learned


@pytest.mark.parametrize("per_axis, narrow_range, shape", [
    (True, True, (3, 3, 4, 5)), (False, True, (3, 3, 4, 5)), (True, True, (6, 5)),
    (True, False, (3, 3, 4, 5)), (True, True, (3, 3, 32, 64)), (False, True, (3, 3, 32, 64))])
def test_kernel_quantizer_is_tfmots_forward_with_an_identity_gradient(per_axis, narrow_range,
                                                                      shape):
    """Forward: tfmot's LastValueQuantizer exactly (ranges stored for the converter), in
    training and inference; backward: the identity (the mask TF's FakeQuant gradient computes,
    without its min/max backprops). Narrow symmetric ranges take qat's own max|k| path, a wide
    one tfmot's; a large per-channel kernel qat's broadcast form of TF's op, but where the
    converter traces it."""
    from qat.quantize import KernelQuantizer

    kernel = tf.Variable(np.random.default_rng(0).normal(0, 1, shape), dtype=tf.float32)
    layer = tf_keras.layers.Layer()
    ours = KernelQuantizer(num_bits=4, per_axis=per_axis, symmetric=True,
                           narrow_range=narrow_range)
    theirs = tfmot.quantization.keras.quantizers.LastValueQuantizer(
        num_bits=4, per_axis=per_axis, symmetric=True, narrow_range=narrow_range)
    our_vars = ours.build(kernel.shape, "ours", layer)
    their_vars = theirs.build(kernel.shape, "theirs", layer)
    upstream = tf.constant(np.random.default_rng(1).normal(0, 1, kernel.shape), tf.float32)
    with tf.GradientTape() as tape:
        quantized = ours(kernel, True, our_vars)
        loss = tf.reduce_sum(quantized * upstream)
    np.testing.assert_array_equal(quantized.numpy(), theirs(kernel, True, their_vars).numpy())
    np.testing.assert_array_equal(tape.gradient(loss, kernel).numpy(), upstream.numpy())
    for end in ("min_var", "max_var"):
        np.testing.assert_array_equal(our_vars[end].numpy(), their_vars[end].numpy())
    kernel.assign(kernel * 1.1)  # inference reads the stored ranges: some weights now clip
    np.testing.assert_array_equal(ours(kernel, False, our_vars).numpy(),
                                  theirs(kernel, False, their_vars).numpy())

    def inference_ops():
        graph = tf.function(lambda: ours(kernel, False, our_vars)).get_concrete_function().graph
        return {op.type for op in graph.get_operations()}

    fake_quant_op = "FakeQuantWithMinMaxVars" + ("PerChannel" if per_axis else "")
    broadcast = per_axis and kernel.shape.num_elements() >= PER_CHANNEL_OP_MAX_SIZE
    assert (fake_quant_op in inference_ops()) != broadcast
    ours.for_converter = True  # the plain FakeQuant the converter reads
    assert fake_quant_op in inference_ops() and "StopGradient" not in inference_ops()


def test_the_converter_traces_tfs_per_channel_op_and_no_bias_rounding():
    """`traced_for_the_converter` switches the graph the converter reads, then switches back:
    large kernels through TF's per-channel op only there, the int32 bias rounding only outside."""
    from qat.quantize import traced_for_the_converter

    qmodel = quantize_model(build_model(ModelConfig(name="convnet", width=32), (8, 8, 1), 10),
                            QuantConfig())
    _train_step(qmodel)

    def large_per_channel_ops():
        fn = tf.function(lambda x: qmodel(x, training=False))
        graph = fn.get_concrete_function(tf.TensorSpec((1, 8, 8, 1))).graph
        return sum(op.type == "FakeQuantWithMinMaxVarsPerChannel" and
                   op.inputs[0].shape.num_elements() >= PER_CHANNEL_OP_MAX_SIZE
                   for op in graph.get_operations())

    large = [kernel for wrapper in _wrappers(qmodel).values()
             for kernel, quantizer, _ in wrapper._weight_vars
             if getattr(quantizer, "per_axis", False)
             and kernel.shape.num_elements() >= PER_CHANNEL_OP_MAX_SIZE]
    quantizers = activation_quantizers(qmodel)
    assert large_per_channel_ops() == 0 and all(q.file_bias for q in quantizers)
    with traced_for_the_converter(qmodel):
        assert large_per_channel_ops() == len(large) > 0  # width 32: 3×3×32×32 convs
        assert not any(q.file_bias for q in quantizers)
    assert large_per_channel_ops() == 0 and all(q.file_bias for q in quantizers)


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


def test_fold_mode_changes_only_per_tensor_kernels():
    """Per-channel symmetric quantization commutes with a per-channel scale: fq(W·s)/s = fq(W)
    for conv kernels, so `quant.bn=fold` differs from `params` there only in leaving the BN
    float; dense kernels (one grid per tensor) are quantized folded in both modes."""
    from tests import reference

    kernels = {}
    for mode in ("params", "fold"):
        tf_keras.utils.set_random_seed(0)
        qmodel = quantize_model(build_model(ModelConfig(width=4), (8, 8, 1), 10),
                                QuantConfig(bn=mode))
        for bn in batchnorm_layers(qmodel):
            rng = np.random.default_rng(4)
            bn.gamma.assign(rng.uniform(0.2, 3.0, bn.gamma.shape) * rng.choice([-1, 1],
                                                                               bn.gamma.shape))
            bn.moving_variance.assign(rng.uniform(0.1, 3.0, bn.gamma.shape))
            bn.quant_switch.assign(0)  # compare the kernels alone
        _train_step(qmodel)
        for name in ("block1b_conv", "fc_dense"):
            weight, quantizer, qvars = _wrappers(qmodel)[name]._weight_vars[0]
            kernels[mode, name] = quantizer(weight, False, qvars).numpy()
        plain_dense = reference.fake_quant_own_range(
            _wrappers(qmodel)["fc_dense"]._weight_vars[0][0].numpy(), 8)
    for name in ("block1b_conv", "fc_dense"):
        np.testing.assert_allclose(kernels["params", name], kernels["fold", name],
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.abs(kernels["fold", "fc_dense"] - plain_dense).max() > 1e-4  # folded, not fq(W)


def _conv_bn_then(activation_layer):
    inputs = tf_keras.Input((6, 6, 2))
    x = tf_keras.layers.Conv2D(3, 3, use_bias=False, name="conv")(inputs)
    x = QuantBatchNorm(name="bn")(x)
    x = activation_layer(x)
    x = tf_keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return tf_keras.Model(inputs, tf_keras.layers.Dense(2, name="logits")(x))


@pytest.mark.parametrize("relu, fused", [
    (tf_keras.layers.ReLU(name="act"), True),
    (tf_keras.layers.ReLU(max_value=6.0, name="act"), True),
    (tf_keras.layers.ReLU(negative_slope=0.1, name="act"), False),
    (tf_keras.layers.ReLU(threshold=0.5, name="act"), False),
])
def test_only_relus_tflite_fuses_go_unquantized_in_front(relu, fused):
    """RELU and RELU6 are fused into the conv; LEAKY_RELU and a thresholded ReLU are ops of
    their own, so the BN's output needs a range of its own."""
    wrappers = _wrappers(quantize_model(_conv_bn_then(relu), QuantConfig()))
    assert bool(wrappers["bn"]._output_quantizers) is not fused
    assert not wrappers["conv"]._output_quantizers  # the BN folds into the conv either way


def _stray_bn_model():
    """BNs with nothing to fold into: after an Add, after a conv with a built-in activation."""
    inputs = tf_keras.Input((6, 6, 2))
    a = tf_keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="a")(inputs)
    b = tf_keras.layers.Conv2D(3, 1, name="b")(inputs)
    x = QuantBatchNorm(name="add_bn")(tf_keras.layers.Add(name="add")([a, b]))
    x = QuantBatchNorm(name="act_bn")(tf_keras.layers.Conv2D(3, 1, activation="relu",
                                                            name="c")(x))
    x = tf_keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return tf_keras.Model(inputs, tf_keras.layers.Dense(2, name="logits")(x))


def test_every_int8_tensor_gets_a_range_in_front_of_a_stray_batchnorm():
    wrappers = _wrappers(quantize_model(_stray_bn_model(), QuantConfig()))
    assert wrappers["add"]._output_quantizers and wrappers["c"]._output_quantizers


def test_a_plan_with_a_tensor_without_range_fails_before_training():
    from qat.errors import ConfigError
    from qat.quantize import _layer_config, check_plan, folding_pairs

    model = _stray_bn_model()
    pairs = folding_pairs(model)
    configs = {layer.name: _layer_config(layer, pairs, QuantConfig())
               for layer in model.layers[1:]}
    check_plan(model, configs, pairs)  # the rules place a range on every tensor
    configs["add"].output_bits = None  # a rule that forgets one
    with pytest.raises(ConfigError, match=r"layer add_bn \(QuantBatchNorm\) reads add \(Add\)"):
        check_plan(model, configs, pairs)


@pytest.mark.parametrize("mode", ["params", "fold"])
@pytest.mark.parametrize("suffix", [".h5", "_savedmodel"])
def test_quant_model_survives_save_and_load(tmp_path, mode, suffix):
    """Folded kernel quantizers find their BN again after loading (it is named in their config).
    (`.keras` files of tfmot-quantized models do not load back in tfmot 0.8.1, its own
    `quantize_model` output included: README, "Saving a QAT model".)"""
    from qat.quantize import quantize_scope

    model = build_model(ModelConfig(width=4), (8, 8, 1), 10)
    qmodel = quantize_model(model, QuantConfig(bn=mode, weight_bits=4))
    for bn in batchnorm_layers(qmodel):
        rng = np.random.default_rng(2)
        bn.gamma.assign(rng.uniform(0.2, 3.0, bn.gamma.shape))
        bn.moving_variance.assign(rng.uniform(0.1, 3.0, bn.gamma.shape))
    x = _train_step(qmodel)
    want = qmodel(x, training=False).numpy()
    path = str(tmp_path / f"qat{suffix}")
    qmodel.save(path)
    with quantize_scope():
        loaded = tf_keras.models.load_model(path)
    np.testing.assert_allclose(loaded(x, training=False).numpy(), want, rtol=1e-5, atol=1e-5)
    quantizer = _wrappers(loaded)["fc_dense"].quantize_config.kernel_quantizer
    assert quantizer.bn is _wrappers(loaded)["fc_bn"].layer


def test_per_layer_precision_and_the_written_plan():
    from qat.config import LayerOverride
    from qat.quantize import quantization_plan

    model = build_model(ModelConfig(name="resnet", width=4), (8, 8, 1), 10)
    cfg = QuantConfig(weight_bits=4, activation_bits=6, layers={
        "stem_*": LayerOverride(weight_bits=8, activation_bits=8),  # first conv at 8 bits
        "logits": LayerOverride(weight_bits=8),
        "res2_add": LayerOverride(skip=True)})
    wrappers = _wrappers(quantize_model(model, cfg))
    assert wrappers["stem_conv"]._weight_vars[0][1].num_bits == 8
    assert wrappers["stem_relu"]._output_quantizers[0].num_bits == 8
    assert wrappers["res1a_conv"]._weight_vars[0][1].num_bits == 4
    assert wrappers["res1_relu"]._output_quantizers[0].num_bits == 6
    assert wrappers["logits"]._weight_vars[0][1].num_bits == 8
    assert not wrappers["res2_add"]._output_quantizers
    plan = {entry["layer"]: entry for entry in quantization_plan(model, cfg)}
    assert set(plan) == {layer.name for layer in model.layers}
    assert plan["stem_conv"] == {"layer": "stem_conv", "type": "Conv2D",
                                 "output": "fused into stem_bn", "kernel": "per_channel",
                                 "weight_bits": 8, "bn": "stem_bn folded in"}
    assert plan["stem_bn"]["bn"].startswith("folded into stem_conv; affine quantized")
    assert plan["res1b_bn"]["output"] == "int8 range (6 bits)"
    assert plan["res2_add"]["output"] == "float (quant.layers skip)"
    assert plan["pool"]["output"] == "int8 range (6 bits)"


def test_inputs_feeding_only_a_concatenation_take_its_range():
    """The int8 file puts such an input straight onto the concatenation's scale (export test:
    test_an_input_feeding_only_a_concatenation_is_quantized_on_its_range). An input that also
    feeds another layer, or is quantized with other bits, keeps a range of its own (the file
    requantizes it). A ReLU left without a quantizer stays a ReLU layer."""
    from tf_keras import layers

    from qat.config import LayerOverride
    from qat.quantize import quantization_plan

    inputs = tf_keras.Input((8, 8, 1))
    a = layers.ReLU(name="a_relu")(layers.Conv2D(4, 3, name="a")(inputs))
    b = layers.ReLU(name="b_relu")(layers.Conv2D(4, 3, padding="same", name="b")(a))
    twice = layers.Conv2D(2, 1, name="twice")(a)  # read twice by the concatenation, only by it
    branches = [b, layers.Conv2D(2, 1, name="side")(a), layers.Conv2D(2, 1, name="low")(a),
                twice, twice]
    x = layers.GlobalAveragePooling2D(name="gap")(layers.Concatenate(name="cat")(branches))
    model = tf_keras.Model(inputs, layers.Dense(3, name="logits")(x))
    cfg = QuantConfig(layers={"low": LayerOverride(activation_bits=4)})
    plan = {entry["layer"]: entry["output"] for entry in quantization_plan(model, cfg)}
    assert plan["b_relu"] == plan["side"] == plan["twice"] == (
        "the range of cat (a concatenation's input)")
    assert plan["low"] == "int8 range (4 bits)"
    assert plan["a_relu"] == "int8 range (8 bits, from 0)"
    wrappers = _wrappers(quantize_model(model, cfg))
    assert type(wrappers["b_relu"].layer).__name__ == "ReLU"
    assert not wrappers["b_relu"]._output_quantizers and not wrappers["side"]._output_quantizers


def test_a_skipped_relu_still_clamps():
    """A ReLU that would fuse into its conv, skipped (left in float), stays a ReLU: before, it
    became qat's identity FusedReLU without the quantizer that computes it, and negatives passed."""
    from qat.config import LayerOverride

    model = build_model(ModelConfig(width=4), (8, 8, 1), 10)
    cfg = QuantConfig(layers={"block1a_relu": LayerOverride(skip=True)})
    qmodel = quantize_model(model, cfg)
    relu = tf_keras.Model(qmodel.inputs, _wrappers(qmodel)["block1a_relu"].output)
    x = np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 1)).astype(np.float32)
    qmodel(x, training=True)  # ranges from a first batch
    out = relu(x, training=False).numpy()
    assert out.min() >= 0.0 and out.max() > 0.0


def test_a_layers_pattern_that_matches_nothing_is_refused():
    from qat.config import LayerOverride
    from qat.errors import ConfigError

    model = build_model(ModelConfig(width=4), (8, 8, 1), 10)
    with pytest.raises(ConfigError, match=r"quant.layers pattern 'conv_\*' matches no layer"):
        quantize_model(model, QuantConfig(layers={"conv_*": LayerOverride(weight_bits=8)}))


def test_a_tf_op_no_quantizer_can_wrap_is_refused_in_one_line():
    """tfmot cannot wrap a TFOpLambda: one left in the model (here: not prepared) would get no
    quantizer while the int8 file has a tensor there. Reshape-like ones pass their grid on, and
    a skipped op's float output through (the plan check refused that reshape until now)."""
    from qat.config import LayerOverride
    from qat.errors import ConfigError

    inputs = tf_keras.Input((8, 8, 3))
    x = tf_keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = tf.reshape(tf.math.sigmoid(x), (-1, 6 * 6 * 4))
    model = tf_keras.Model(inputs, tf_keras.layers.Dense(2, name="logits")(x))
    sigmoid = next(layer.name for layer in model.layers if "sigmoid" in layer.name)
    with pytest.raises(ConfigError, match=r"\(TFOpLambda tf\.math\.sigmoid\) is a TensorFlow "
                                          r"op no quantizer can wrap: run qat\.prepare") as error:
        quantize_model(model, QuantConfig())
    assert "\n" not in str(error.value) and f"quant.layers.{sigmoid}.skip=true" in str(error.value)
    quantize_model(model, QuantConfig(layers={sigmoid: LayerOverride(skip=True)}))


def test_a_layer_without_rule_can_be_left_in_float():
    from qat.config import LayerOverride
    from qat.errors import ConfigError

    inputs = tf_keras.Input((4, 4, 2))
    x = tf_keras.layers.Conv2D(3, 1, name="conv")(inputs)
    x = tf_keras.layers.LayerNormalization(name="ln")(x)
    model = tf_keras.Model(inputs, tf_keras.layers.GlobalAveragePooling2D(name="gap")(x))
    with pytest.raises(ConfigError, match=r"ln \(LayerNormalization\) has no quantization rule: "
                                          r"leave it in float with quant.layers.ln.skip=true"):
        quantize_model(model, QuantConfig())
    wrappers = _wrappers(quantize_model(model, QuantConfig(layers={"ln": LayerOverride(
        skip=True)})))
    assert not wrappers["ln"]._output_quantizers and wrappers["conv"]._output_quantizers
