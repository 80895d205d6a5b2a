"""Export on a trained run: written files, int8 dtypes, agreement with the QAT model."""

import dataclasses
import json
import os

import numpy as np
import pytest

from qat.config import DataConfig, TrainerConfig
from qat.data import load_arrays

pytestmark = pytest.mark.slow


CASES = [("resnet", "params"), ("mobilenet", "fold"), ("convnet", "fold")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Digits runs: one float run per model, then the quant phase in the given BN mode."""
    from qat.config import ModelConfig, QATConfig, QuantConfig, RunConfig
    from qat.phases import run_float, run_quant

    root = tmp_path_factory.mktemp("export")
    arrays = load_arrays(DataConfig())

    def make(model: str, mode: str):
        base = QATConfig(run=RunConfig(dir=str(root / model)), model=ModelConfig(name=model),
                         trainer=TrainerConfig(epochs=6, verbose=0))
        if not os.path.isdir(os.path.join(base.run.dir, "float")):
            run_float(base, arrays)
        settings = dataclasses.replace(
            base, run=RunConfig(dir=str(root / f"{model}_{mode}")),
            quant=QuantConfig(bn=mode, epochs=1, init_from=os.path.join(base.run.dir, "float")))
        run_quant(settings, arrays)
        return settings

    return make, arrays


@pytest.mark.parametrize("model, mode", CASES)
def test_export_writes_int8_file_that_agrees_with_qat_model(trained, model, mode):
    from ai_edge_litert.interpreter import Interpreter

    from qat.export import export_run

    make, arrays = trained
    settings = make(model, mode)
    report = export_run(settings, arrays)
    out = os.path.join(settings.run.dir, "export")
    for name in ("saved_model", "model_float.tflite", "model_int8.tflite", "report.json"):
        assert os.path.exists(os.path.join(out, name))
    with open(os.path.join(out, "report.json")) as fh:
        assert json.load(fh) == pytest.approx(report)
    assert report["fold_max_abs_diff"] < 1e-3
    assert report["int8_agreement"] >= 0.99
    assert abs(report["tflite_int8_accuracy"] - report["qat_val_accuracy"]) <= 0.01
    assert report["int8_bytes"] < report["float_bytes"]

    interpreter = Interpreter(model_path=os.path.join(out, "model_int8.tflite"))
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert interpreter.get_output_details()[0]["dtype"] == np.int8
    details = interpreter.get_tensor_details()
    # Kernels keep the name of their fake-quant op; activations are the 1×H×W×C tensors.
    conv_weights = [d for d in details if "LastValueQuant" in d["name"] and len(d["shape"]) == 4]
    assert conv_weights and all(d["dtype"] == np.int8 for d in conv_weights)
    for d in conv_weights:  # per output channel: one scale per channel
        params = d["quantization_parameters"]
        assert len(params["scales"]) == d["shape"][params["quantized_dimension"]] > 1
    float_tensors = [d["name"] for d in details if d["dtype"] == np.float32]
    assert not float_tensors, f"full-int8 file has float tensors: {float_tensors[:5]}"
