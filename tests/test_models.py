"""Every model normalizes with qat's BN, right after a bias-free linear layer or an add."""

import pytest
import tf_keras

from qat.config import ModelConfig
from qat.layers import QuantBatchNorm
from qat.models import build_model
from qat.quantize import folding_pairs


@pytest.mark.parametrize("name", ["convnet", "resnet", "mobilenet"])
def test_models_use_qat_batchnorm_after_bias_free_linear_layers(name):
    model = build_model(ModelConfig(name=name, width=4), (16, 16, 1), 10)
    bns = [layer for layer in model.layers if isinstance(layer, QuantBatchNorm)]
    assert bns, "every model must contain qat's BN"
    assert not any(isinstance(layer, tf_keras.layers.BatchNormalization)
                   for layer in model.layers)
    pairs = folding_pairs(model)
    assert set(pairs) == {bn.name for bn in bns}  # every BN folds into something
    for linear in pairs.values():
        assert model.get_layer(linear).get_config()["use_bias"] is False
    assert model.output_shape == (None, 10)


def test_mobilenet_has_depthwise_and_resnet_has_adds():
    mobile = build_model(ModelConfig(name="mobilenet", width=4), (16, 16, 1), 10)
    res = build_model(ModelConfig(name="resnet", width=4), (16, 16, 1), 10)
    assert any(isinstance(layer, tf_keras.layers.DepthwiseConv2D) for layer in mobile.layers)
    assert any(isinstance(layer, tf_keras.layers.Add) for layer in res.layers)
