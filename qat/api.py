"""Python API for people with their own training loop or notebook.

    import qat
    model = qat.prepare(keras_model)                        # qat's BN, flat graph, logits out
    qmodel = qat.quantize_model(model, qat.QuantConfig())   # fake-quantized, BN switched on
    qmodel.compile(...); qmodel.fit(...)                    # any Keras recipe
    report = qat.export_model(qmodel, model, x_val, y_val, "out")  # int8 file, evaluated

The same functions the CLI runs (`qat.sources`, `qat.quantize`, `qat.export`); the settings are
the CLI's dataclasses, so every `quant.*` / `export.*` key is available here too.
(`qat.quantize_model` is `qat.quantize.quantize_model`: `cfg` defaults to QuantConfig().)
"""

from __future__ import annotations

import numpy as np
import tf_keras

from qat.config import ExportConfig
from qat.convert import convert_batchnorms
from qat.export import Inputs, export_quant_model
from qat.sources import as_logits


def prepare(model: tf_keras.Model) -> tf_keras.Model:
    """A float model qat can quantize: Keras BN → qat's BN (weights carried, same outputs),
    nested models inlined, a final softmax dropped (logits out). The input is left untouched."""
    return convert_batchnorms(as_logits(model))


def export_model(qmodel: tf_keras.Model, model: tf_keras.Model, x: Inputs, y: np.ndarray,
                 out_dir: str, export_settings: ExportConfig | None = None) -> dict:
    """Fold, write SavedModel + float/int8 TFLite + report.json to `out_dir`, evaluate the files
    on (x, y); `x`: an array, or one per model input (a list, or a dict by input name).
    `model`: the prepared float model `qmodel` came from (left untouched). The file quantizes
    every tensor and kernel as `qmodel`'s own quantizers do: a reloaded QAT model needs nothing
    else."""
    float_model = tf_keras.models.clone_model(model)  # same layer names, fresh weights
    return export_quant_model(qmodel, float_model, x, y, out_dir,
                              export_settings or ExportConfig())
