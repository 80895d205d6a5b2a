"""keras.applications end to end on tiny inputs: convert, quantize, train, fold, full-int8 file.

Untrained nets have near-tied logits, so argmax agreement means little here (FIELD-NOTES); the
file's fidelity is checked on the logits themselves: on average within two output steps of the
QAT model's (int8 kernels round each of ~50 requantizations their own way; measured up to 1.3
steps on ResNet50V2). Trained-model agreement is in `make coverage`.
"""

import numpy as np
import pytest
import tf_keras

from qat.api import prepare
from qat.config import ExportConfig, QuantConfig
from qat.export import export_quant_model, tflite_logits
from qat.layers import QuantBatchNorm
from qat.quantize import quantize_model

# 2-5 minutes each on 2 cores (graph size, not compute): `make test-heavy` runs them, so
# `make test` stays well under its 15-minute budget; it keeps the applications' construction
# and conversion (tests/test_sources.py, tests/test_convert.py).
pytestmark = [pytest.mark.slow, pytest.mark.heavy]

SHAPE, CLASSES = (32, 32, 3), 10
ARCHS = {  # tfmot's quantize_model refuses all but MobileNetV2 (FIELD-NOTES)
    "MobileNetV2": {"alpha": 0.35},
    "EfficientNetB0": {},  # Rescaling, Normalization, swish, squeeze-excite Multiply
    "ResNet50V2": {},  # BN after Add: pre-activation blocks
    "DenseNet121": {},  # BN after Concatenate
}


@pytest.mark.parametrize("arch", ARCHS)
def test_application_exports_a_full_int8_file_that_computes_the_qat_model(arch, tmp_path):
    original = getattr(tf_keras.applications, arch)(
        input_shape=SHAPE, classes=CLASSES, weights=None, classifier_activation=None,
        **ARCHS[arch])
    rng = np.random.default_rng(0)
    for layer in original.layers:  # statistics that make a wrong conversion visible
        if isinstance(layer, tf_keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, c))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c))
    x = rng.uniform(0, 255, (32, *SHAPE)).astype(np.float32)
    y = rng.integers(0, CLASSES, 32)
    model = prepare(original)
    assert any(isinstance(layer, QuantBatchNorm) for layer in model.layers)
    want = original(x, training=False).numpy()
    np.testing.assert_allclose(model(x, training=False).numpy(), want,
                               atol=1e-4 * max(1.0, np.abs(want).max()), rtol=1e-4)

    qmodel = quantize_model(model, QuantConfig())
    qmodel.compile(tf_keras.optimizers.Adam(1e-4),
                   tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qmodel.fit(x, y, batch_size=16, epochs=1, verbose=0)
    out = tmp_path / "export"
    report = export_quant_model(qmodel, model, x, y, str(out), ExportConfig(fold_tolerance=1e-3))
    assert report["int8_float_tensors"] == [] and report["int8_float_ops"] == []
    from ai_edge_litert.interpreter import Interpreter

    path = str(out / "model_int8.tflite")
    step = Interpreter(model_path=path).get_output_details()[0]["quantization"][0]
    diff = np.abs(tflite_logits(path, x) - qmodel.predict(x, verbose=0))
    assert diff.mean() <= 2 * step, (diff.mean(), step)
