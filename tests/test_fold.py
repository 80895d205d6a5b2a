"""Folding every layer kind against the unfolded model, in float and quantized BN mode."""

import numpy as np
import pytest
import tf_keras
from tf_keras import layers

from qat import fold as fold_mod
from qat.errors import ExportError
from qat.fold import fold_batchnorms, parity
from qat.layers import QuantBatchNorm, set_switches

EPS = 0.05  # large, so a fold that forgets epsilon is visibly wrong


def _bn(name):
    return QuantBatchNorm(epsilon=EPS, name=name)


def _randomize(model, seed=0):
    """Random weights and non-trivial BN statistics: gamma of both signs, mu != 0, var != 1."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, QuantBatchNorm):
            c = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.3, 2.0, c) * rng.choice([-1.0, 1.0], c))
            layer.beta.assign(rng.normal(0, 1, c))
            layer.moving_mean.assign(rng.normal(0, 1, c))
            layer.moving_variance.assign(rng.uniform(0.05, 4.0, c))
        else:
            layer.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32)
                               for w in layer.get_weights()])
    return model


def conv_model():
    x = inp = tf_keras.Input((8, 8, 3))
    x = layers.Conv2D(5, 3, padding="same", use_bias=False, name="conv")(x)
    x = _bn("conv_bn")(x)
    return tf_keras.Model(inp, layers.ReLU(name="relu")(x))


def depthwise_model():
    x = inp = tf_keras.Input((8, 8, 3))
    x = layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False,
                               name="dw")(x)
    return tf_keras.Model(inp, _bn("dw_bn")(x))


def dense_model():
    x = inp = tf_keras.Input((4, 4, 2))
    x = layers.Flatten(name="flat")(x)
    x = layers.Dense(6, use_bias=True, name="dense")(x)  # a bias too: b' = beta + (b - mu) s
    return tf_keras.Model(inp, _bn("dense_bn")(x))


def stray_bn_model():
    """BNs with nothing to fold into: at the input, after an add, and on N×C after a ReLU."""
    inp = tf_keras.Input((6, 6, 3))
    x = _bn("input_bn")(inp)
    a = layers.Conv2D(4, 3, padding="same", use_bias=False, name="a")(x)
    b = layers.Conv2D(4, 1, use_bias=False, name="b")(x)
    x = _bn("add_bn")(layers.Add(name="add")([a, b]))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.ReLU(name="relu")(layers.Dense(5, use_bias=False, name="fc")(x))
    return tf_keras.Model(inp, _bn("vector_bn")(x))


BUILDERS = [conv_model, depthwise_model, dense_model, stray_bn_model]


def _x(model, seed=1):
    shape = (16, *model.input_shape[1:])
    return np.random.default_rng(seed).normal(0.5, 1.0, shape).astype(np.float32)


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize("quantized", [False, True])
def test_fold_matches_unfolded(builder, quantized):
    model = _randomize(builder())
    if quantized:  # fold must use the fake-quantized gamma, beta, mu, sigma^2
        set_switches(model, quantize=True)
    folded = fold_batchnorms(model)
    assert not any(isinstance(layer, QuantBatchNorm) for layer in folded.layers)
    bn_names = {layer.name for layer in model.layers if isinstance(layer, QuantBatchNorm)}
    kept = {layer.name for layer in folded.layers}
    assert {layer.name for layer in model.layers} - bn_names <= kept
    x = _x(model)
    ref = model(x, training=False).numpy()
    diff = np.abs(folded(x).numpy() - ref).max()
    assert diff <= 1e-4 * max(1.0, np.abs(ref).max())
    assert parity(model, folded, x, tolerance=1e-4) == pytest.approx(diff, abs=1e-6)


def test_stray_batchnorms_become_scale_and_shift_not_dropped():
    folded = fold_batchnorms(_randomize(stray_bn_model()))
    kinds = {layer.name: type(layer).__name__ for layer in folded.layers}
    assert kinds["input_bn"] == "DepthwiseConv2D" and kinds["add_bn"] == "DepthwiseConv2D"
    assert kinds["vector_bn"] == "ChannelAffine"


def test_a_wrong_fold_is_caught(monkeypatch):
    model = _randomize(conv_model())

    def forgets_epsilon(bn):
        gamma, beta, mean, variance = (t.numpy().astype(np.float64)
                                       for t in bn.effective_params())
        return gamma / np.sqrt(variance), mean, beta

    monkeypatch.setattr(fold_mod, "bn_scale_shift", forgets_epsilon)
    wrong = fold_batchnorms(model)
    with pytest.raises(ExportError, match="folding is wrong"):
        parity(model, wrong, _x(model), tolerance=1e-4)
