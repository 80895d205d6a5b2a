"""qat: quantization-aware fine-tuning for TensorFlow with fused-speed quantized BatchNorm.

tfmot needs Keras 2 (`tf_keras`). TensorFlow picks its Keras at first import, so the switch is
set here, in the one place every qat module passes through before it imports TensorFlow.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
