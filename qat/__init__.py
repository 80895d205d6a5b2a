"""qat: quantization-aware fine-tuning for TensorFlow with fused-speed quantized BatchNorm.

tfmot needs Keras 2 (`tf_keras`). TensorFlow picks its Keras at first import, so the switch is
set here, in the one place every qat module passes through before it imports TensorFlow.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

# Not `quantize`/`export`: those names are qat's modules.
_API = {"prepare": "qat.api", "quantize_model": "qat.quantize", "export_model": "qat.api",
        "QuantConfig": "qat.config", "ExportConfig": "qat.config", "LayerOverride": "qat.config"}


def __getattr__(name: str):
    """`qat.prepare`, `qat.quantize_model`, `qat.export_model`, ...: imported on first use, so
    `import qat` (and a config error on the command line) never waits for TensorFlow."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'qat' has no attribute {name!r}")
