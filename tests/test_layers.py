"""qat's BN layer against NumPy: float mode, quantized mode, freeze, gradients, checkpoints."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from qat.layers import QuantBatchNorm, batchnorm_layers, set_switches
from tests import reference

EPS = 1e-3
SHAPES = [(16, 5, 5, 3), (32, 3)]  # NHWC and N×C


def _layer(shape, momentum=0.9, **kwargs) -> QuantBatchNorm:
    layer = QuantBatchNorm(momentum=momentum, epsilon=EPS, **kwargs)
    layer.build(shape)
    rng = np.random.default_rng(1)
    c = shape[-1]
    layer.gamma.assign(rng.uniform(0.5, 2.0, c) * rng.choice([-1, 1], c))
    layer.beta.assign(rng.normal(0, 1, c))
    layer.moving_mean.assign(rng.normal(0, 1, c))
    layer.moving_variance.assign(rng.uniform(0.2, 3.0, c))
    return layer


def _x(shape, seed=0):
    return (np.random.default_rng(seed).normal(2.0, 3.0, size=shape)).astype(np.float32)


def _params(layer):
    return [v.numpy().astype(np.float64) for v in
            (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance)]


def _quantized_params(layer):
    """What the kernel gets in quantized mode, from the NumPy reference of the layer's settings."""
    return reference.quantized_batchnorm_params(
        *_params(layer), EPS, bits=layer.bn_bits, target=layer.bn_target, fmt=layer.bn_format,
        variance_term=layer.bn_variance)


# Every (target, format) pair, plus the variance itself as params' variance term.
QUANT_SETTINGS = [{"bn_target": t, "bn_format": f} for t in ("affine", "params")
                  for f in ("channel_exponent", "tensor")] + [
    {"bn_target": "params", "bn_format": "tensor", "bn_variance": "variance"}]


# -- structure ---------------------------------------------------------------------------
def test_weights_and_config_round_trip():
    layer = _layer((4, 3), bn_bits=6, bn_target="params", bn_format="tensor",
                   bn_variance="variance")
    assert [w.name.split("/")[-1].split(":")[0] for w in layer.weights] == [
        "gamma", "beta", "moving_mean", "moving_variance", "quant_switch", "freeze_switch"]
    assert len(layer.trainable_weights) == 2
    clone = QuantBatchNorm.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


# -- float mode ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_float_training_output_uses_batch_statistics(shape):
    layer, x = _layer(shape), _x(shape)
    g, b, _, _ = _params(layer)
    mean, var = reference.batch_moments(x)
    got = layer(x, training=True).numpy()
    np.testing.assert_allclose(got, reference.batchnorm(x, g, b, mean, var, EPS), atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_float_inference_output_uses_moving_statistics(shape):
    layer, x = _layer(shape), _x(shape)
    g, b, m, v = _params(layer)
    np.testing.assert_allclose(layer(x, training=False).numpy(),
                               reference.batchnorm(x, g, b, m, v, EPS), atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_moving_statistics_after_n_steps(shape):
    layer = _layer(shape, momentum=0.8)
    _, _, m, v = _params(layer)
    n = np.prod(shape[:-1])
    for step in range(5):
        x = _x(shape, seed=step)
        layer(x, training=True)
        mean, var = reference.batch_moments(x)
        m = reference.moving_update(m, mean, 0.8)
        # Keras' conventions: NHWC (fused kernel) averages the unbiased batch variance, N×C
        # (Keras' non-fused path) the biased one.
        v = reference.moving_update(v, var * n / (n - 1) if len(shape) == 4 else var, 0.8)
    np.testing.assert_allclose(layer.moving_mean.numpy(), m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), v, rtol=1e-5, atol=1e-5)


def test_moving_statistics_update_in_a_custom_tf_function_loop():
    layer = _layer((8, 4, 4, 2), momentum=0.5)
    before = layer.moving_mean.numpy().copy()
    step = tf.function(lambda x: layer(x, training=True))
    for i in range(3):
        step(tf.constant(_x((8, 4, 4, 2), seed=i)))
    assert not np.allclose(layer.moving_mean.numpy(), before)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("synchronized", [False, True])
def test_gradients_match_finite_differences(shape, training, synchronized):
    # keep the moving stats still while probing
    layer = _layer(shape, momentum=1.0 - 1e-7, synchronized=synchronized)
    small = tuple(min(d, 4) for d in shape)
    x = tf.constant(_x(small))
    upstream = tf.constant(np.random.default_rng(5).normal(size=small).astype(np.float32))

    def loss():
        return tf.reduce_sum(layer(x, training=training) * upstream)

    # d loss / d x: TensorFlow's own checker.
    theoretical, numerical = tf.test.compute_gradient(
        lambda x_: layer(x_, training=training), [x], delta=1e-2)
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=2e-2, rtol=2e-2)
    # d loss / d gamma, d beta: central differences on each channel.
    with tf.GradientTape() as tape:
        value = loss()
    grads = tape.gradient(value, [layer.gamma, layer.beta])
    for var, grad in zip([layer.gamma, layer.beta], grads, strict=False):
        for c in range(shape[-1]):
            base = var.numpy()
            bump = np.zeros_like(base)
            bump[c] = 1e-2
            var.assign(base + bump)
            up = float(loss())
            var.assign(base - bump)
            down = float(loss())
            var.assign(base)
            assert grad.numpy()[c] == pytest.approx((up - down) / 2e-2, rel=1e-2, abs=1e-2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quantized", [False, True])
def test_synchronized_statistics_equal_the_fused_kernel_on_one_replica(shape, quantized):
    """`synchronized` computes the moments outside the kernel and feeds them to its inference
    path with a gradient of its own: on one replica it must be the fused training step exactly
    (outputs, gradients to x/gamma/beta, moving statistics), in float and quantized mode."""
    fused, synced = _layer(shape, momentum=0.8), _layer(shape, momentum=0.8, synchronized=True)
    set_switches(None, quantize=quantized, layers=[fused, synced])
    upstream = tf.constant(np.random.default_rng(7).normal(size=shape).astype(np.float32))
    for step in range(3):
        x = tf.constant(_x(shape, seed=step))
        results = []
        for layer in (fused, synced):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * upstream)
            results.append([y, *tape.gradient(loss, [x, layer.gamma, layer.beta])])
        for want, got in zip(*results, strict=True):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(getattr(synced, name).numpy(), getattr(fused, name).numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_synchronized_frozen_layer_uses_moving_statistics_and_keeps_them():
    layer = _layer((8, 4, 4, 3), synchronized=True)
    set_switches(None, freeze=True, layers=[layer])
    g, b, m, v = _params(layer)
    x = _x((8, 4, 4, 3))
    np.testing.assert_allclose(layer(x, training=True).numpy(),
                               reference.batchnorm(x, g, b, m, v, EPS), atol=1e-4)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), m.astype(np.float32))


def test_single_example_inference_uses_moving_statistics():
    """A batch of one in inference mode must not normalize with its own statistics."""
    model = tf_keras.Sequential([tf_keras.Input((6,)), QuantBatchNorm(momentum=0.5)])
    model.compile("sgd", "mse")
    data = np.random.default_rng(0).normal(5.0, 2.0, size=(256, 6)).astype(np.float32)
    model.fit(data, data, epochs=3, batch_size=32, verbose=0)
    one = data[:1]
    bn = model.layers[0]
    g, b, m, v = _params(bn)
    out = model(one, training=False).numpy()
    np.testing.assert_allclose(out, reference.batchnorm(one, g, b, m, v, EPS), atol=1e-4)
    assert np.abs(out).max() > 1e-2  # its own statistics would give exactly beta


def test_checkpoint_restores_moving_statistics_exactly(tmp_path):
    shape = (8, 4, 4, 3)
    layer = _layer(shape)
    for i in range(3):
        layer(_x(shape, seed=i), training=True)
    layer.quant_switch.assign(1)
    path = tf.train.Checkpoint(bn=layer).save(str(tmp_path / "ckpt"))
    restored = QuantBatchNorm(momentum=0.9, epsilon=EPS)
    restored.build(shape)
    tf.train.Checkpoint(bn=restored).read(path).assert_existing_objects_matched()
    for a, b in zip(layer.weights, restored.weights, strict=False):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# -- quantized mode ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("settings", QUANT_SETTINGS)
def test_quant_inference_matches_reference(shape, settings):
    layer, x = _layer(shape, bn_bits=4, **settings), _x(shape)
    layer.quant_switch.assign(1)
    g, b, m, v = _quantized_params(layer)
    quant_out = layer(x, training=False).numpy()
    np.testing.assert_allclose(quant_out, reference.batchnorm(x, g, b, m, v, EPS), atol=2e-4)
    layer.quant_switch.assign(0)
    assert np.abs(layer(x, training=False).numpy() - quant_out).max() > 1e-3  # 4 bits show


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("settings", QUANT_SETTINGS[:2])
def test_quant_training_uses_quantized_gamma_beta_and_batch_statistics(shape, settings):
    layer, x = _layer(shape, bn_bits=4, **settings), _x(shape)
    layer.quant_switch.assign(1)
    g, b, _, _ = _quantized_params(layer)
    mean, var = reference.batch_moments(x)
    np.testing.assert_allclose(layer(x, training=True).numpy(),
                               reference.batchnorm(x, g, b, mean, var, EPS), atol=2e-4)


@pytest.mark.parametrize("target", ["affine", "params"])
def test_affine_quantization_is_exactly_the_stored_multiplier_and_offset(target):
    """With moving statistics the layer computes m_q * x + o_q, the pair the file stores."""
    layer, x = _layer((64, 5), bn_bits=5, bn_target=target), _x((64, 5))
    layer.quant_switch.assign(1)
    g, b, m, v = _params(layer)
    multiplier = g / np.sqrt(v + EPS)
    m_q = reference.channel_exponent_grid(multiplier, 5)
    o_q = reference.channel_exponent_grid(b - m * multiplier, 5)
    got = layer(x, training=False).numpy()
    if target == "affine":
        np.testing.assert_allclose(got, x * m_q + o_q, atol=1e-4, rtol=1e-5)
    else:  # rounding gamma and 1/sigma apart: the product lies on no 5-bit grid
        assert np.abs(got - (x * m_q + o_q)).max() > 1e-3


def test_straight_through_gradients_reach_gamma_and_beta():
    shape = (8, 4, 4, 3)
    layer, x = _layer(shape, bn_bits=4), tf.constant(_x(shape))
    layer.quant_switch.assign(1)
    upstream = tf.constant(np.random.default_rng(3).normal(size=shape).astype(np.float32))
    with tf.GradientTape() as tape:
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * upstream)
    d_gamma, d_beta = tape.gradient(loss, [layer.gamma, layer.beta])
    # STE: d/dgamma of gamma_q * x_hat is x_hat, exactly as in float BN.
    mean, var = reference.batch_moments(x.numpy())
    x_hat = (x.numpy() - mean) / np.sqrt(var + EPS)
    np.testing.assert_allclose(d_gamma.numpy(), (upstream.numpy() * x_hat).reshape(-1, 3).sum(0),
                               rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(d_beta.numpy(), upstream.numpy().reshape(-1, 3).sum(0), rtol=1e-4)


def test_switch_changes_outputs_without_retracing():
    shape = (8, 4, 4, 3)
    layer, x = _layer(shape, bn_bits=3), tf.constant(_x(shape))
    traces = []

    @tf.function
    def infer(x_):
        traces.append(1)
        return layer(x_, training=False)

    off = infer(x).numpy()
    set_switches(None, quantize=True, layers=[layer])
    on = infer(x).numpy()
    set_switches(None, quantize=False, layers=[layer])
    off_again = infer(x).numpy()
    assert len(traces) == 1
    assert np.abs(on - off).max() > 1e-3
    np.testing.assert_array_equal(off, off_again)


@pytest.mark.parametrize("shape", SHAPES)
def test_moving_statistics_update_before_freeze_and_stay_fixed_after(shape):
    layer = _layer(shape, momentum=0.5)
    layer.quant_switch.assign(1)
    layer.freezable = True  # the traced step reads the freeze switch flipped below
    step = tf.function(lambda x_: layer(x_, training=True))
    _, _, m, v = _params(layer)
    x = _x(shape, seed=1)
    step(tf.constant(x))
    mean, var = reference.batch_moments(x)
    n = np.prod(shape[:-1])
    batch_var = var * n / (n - 1) if len(shape) == 4 else var  # Keras' convention per rank
    moved = (reference.moving_update(m, mean, 0.5), reference.moving_update(v, batch_var, 0.5))
    np.testing.assert_allclose(layer.moving_mean.numpy(), moved[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), moved[1], rtol=1e-5, atol=1e-5)
    frozen = (layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy())
    layer.freeze_switch.assign(1)
    x = _x(shape, seed=2)
    out = step(tf.constant(x)).numpy()
    np.testing.assert_array_equal(layer.moving_mean.numpy(), frozen[0])
    np.testing.assert_array_equal(layer.moving_variance.numpy(), frozen[1])
    # After the freeze, training normalizes with the quantized moving statistics.
    g, b, m, v = _quantized_params(layer)
    np.testing.assert_allclose(out, reference.batchnorm(x, g, b, m, v, EPS), atol=2e-4)


def test_batchnorm_layers_finds_layers_inside_models():
    model = tf_keras.Sequential([tf_keras.Input((4,)), QuantBatchNorm(), tf_keras.layers.Dense(2),
                                 QuantBatchNorm()])
    assert len(batchnorm_layers(model)) == 2


# -- Keras parity and the outlier probe ------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 6, 3), (5,)])
def test_training_matches_keras_batchnorm_on_both_ranks(shape):
    """A converted Keras model must continue training identically: same outputs, same moving
    statistics after several fit steps (NHWC: Keras' fused path; N×C: its non-fused path)."""
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(64, *shape)).astype(np.float32)
    y = rng.normal(size=(64, *shape)).astype(np.float32)
    models = []
    for bn in (tf_keras.layers.BatchNormalization(momentum=0.8, epsilon=EPS),
               QuantBatchNorm(momentum=0.8, epsilon=EPS)):
        model = tf_keras.Sequential([tf_keras.Input(shape), bn])
        for weight, value in zip(model.layers[-1].weights[:4], [
                np.linspace(0.5, 1.5, shape[-1]), np.linspace(-1, 1, shape[-1]),
                np.zeros(shape[-1]), np.ones(shape[-1])], strict=True):
            weight.assign(value)
        model.compile(tf_keras.optimizers.SGD(0.1), "mse")
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        models.append(model)
    keras_model, qat_model = models
    for a, b in zip(keras_model.layers[-1].weights, qat_model.layers[-1].weights[:4],
                    strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.name)
    np.testing.assert_allclose(qat_model(x, training=False), keras_model(x, training=False),
                               rtol=1e-5, atol=1e-5)


def _probe_layer(variance, mean, **settings) -> QuantBatchNorm:
    """The review's probe: per-channel statistics far apart, quantized at 8 bits."""
    from qat.config import QuantConfig

    defaults = QuantConfig()
    config = {"bn_bits": 8, "bn_target": defaults.bn_target, "bn_format": defaults.bn_format,
              **settings}
    layer = QuantBatchNorm(epsilon=EPS, **config)
    layer.build((None, len(variance)))
    layer.moving_variance.assign(variance)
    layer.moving_mean.assign(mean)
    layer.quant_switch.assign(1)
    return layer


def _effective_multiplier_and_mean(layer):
    """(m, mu): the deployed BN computes m * (x - mu) + beta, per channel."""
    gamma, beta, mean, variance = (t.numpy().astype(np.float64)
                                   for t in layer.effective_params())
    multiplier = gamma / np.sqrt(variance + EPS)
    offset = beta - mean * multiplier
    return multiplier, (layer.beta.numpy() - offset) / multiplier


PROBE_VARIANCES = np.array([1e-6, 0.5, 1, 2, 20, 100])


@pytest.mark.parametrize("settings", [{}, {"bn_target": "params"}])
def test_no_channel_is_harmed_by_another_at_8_bits(settings):
    """Default format: every multiplier within 5 % and every normalized mean within 0.05 std,
    however far apart the channels' statistics lie."""
    layer = _probe_layer(PROBE_VARIANCES, np.zeros(6), **settings)
    multiplier, _ = _effective_multiplier_and_mean(layer)
    ratios = multiplier * np.sqrt(PROBE_VARIANCES + EPS)
    np.testing.assert_allclose(ratios, 1.0, atol=0.05)

    variance, mean = np.array([1.0, 1e-3]), np.array([5.0, 0.1])
    layer = _probe_layer(variance, mean, **settings)
    _, effective_mean = _effective_multiplier_and_mean(layer)
    assert np.all(np.abs(effective_mean - mean) / np.sqrt(variance + EPS) <= 0.05)


def test_one_grid_per_tensor_lets_an_outlier_channel_crush_the_small_ones():
    """Why `tensor` is not the default: the probe's large multiplier sets the grid step."""
    layer = _probe_layer(PROBE_VARIANCES, np.zeros(6), bn_format="tensor")
    multiplier, _ = _effective_multiplier_and_mean(layer)
    ratios = multiplier * np.sqrt(PROBE_VARIANCES + EPS)
    assert np.abs(ratios - 1.0).max() > 0.05


@pytest.mark.parametrize("settings", QUANT_SETTINGS)
def test_every_parameter_element_gets_the_identity_gradient(settings):
    """Straight-through to every element, the ends of each vector's range included."""
    shape = (16, 3, 3, 4)
    layer = _layer(shape, bn_bits=4, **settings)
    layer.quant_switch.assign(1)
    with tf.GradientTape() as tape:
        gamma, beta, _, _ = layer.effective_params()
        loss = tf.reduce_sum(gamma) + 2.0 * tf.reduce_sum(beta)
    d_gamma, d_beta = tape.gradient(loss, [layer.gamma, layer.beta])
    if settings["bn_target"] == "affine":  # beta' = o_q + m_q * mean also moves with gamma
        np.testing.assert_allclose(d_gamma.numpy(), 1.0, rtol=1e-5)
    else:
        np.testing.assert_array_equal(d_gamma.numpy(), 1.0)
    np.testing.assert_allclose(d_beta.numpy(), 2.0, rtol=1e-6)


def test_training_graph_reads_the_freeze_switch_only_when_freezable():
    """Not freezable (the default): the training step has no batch-or-moving tf.cond (its cost:
    ~20 % of a MobileNetV2 float step on CPU) and normalizes with batch statistics whatever the
    switch says; freezable: the cond is there and the switch is obeyed."""
    shape = (8, 4, 4, 3)
    x = tf.constant(_x(shape, seed=3))

    def conds(layer):
        graph = tf.function(lambda x_: layer(x_, training=True)).get_concrete_function(x).graph
        return sum(op.type in ("If", "StatelessIf") for op in graph.get_operations())

    fast, freezable = _layer(shape), _layer(shape)
    freezable.freezable = True
    assert conds(fast) < conds(freezable)
    fast.freeze_switch.assign(1)  # flipped without set_switches: not read
    mean, var = reference.batch_moments(_x(shape, seed=3))
    g, b, _, _ = _params(fast)
    np.testing.assert_allclose(fast(x, training=True).numpy(),
                               reference.batchnorm(_x(shape, seed=3), g, b, mean, var, EPS),
                               atol=1e-4)
    set_switches(None, freeze=True, layers=[fast])  # freezing makes it freezable
    assert fast.freezable
