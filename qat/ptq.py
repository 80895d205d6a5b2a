"""Simulated post-training quantization at the run's own precision plan: the baseline QAT must
beat below 8 bits, where TFLite's converter has no PTQ to offer.

The float checkpoint is quantized exactly as the quant phase quantizes it (same bits per layer,
BN mode, first/last layers at 8 bits), and nothing is trained: kernels round to nearest on their
min-max grids (tfmot's LastValueQuantizer, per channel), BN keeps its moving statistics (frozen)
and each activation range is the average of the calibration batches' [min, max]. The model is
evaluated with its fake-quant ops in inference mode, the "simulated" PTQ of the literature; at
8 bits it lands next to the converter's own PTQ file (both are in report.json, a check on it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import tf_keras

from qat.config import QuantConfig
from qat.layers import batchnorm_layers, set_switches
from qat.quantize import activation_quantizers, quantize_model


def calibrate(qmodel: tf_keras.Model, images: Iterable) -> int:
    """Set every EMA activation range of `qmodel` to the mean of the batches' extents (batch k
    enters with weight 1/k) and every kernel range to its weights' min-max, with every BN
    frozen on its moving statistics; returns the number of batches used."""
    quantizers = activation_quantizers(qmodel)
    saved = [(q, q.ema_decay) for q in quantizers]
    bns = batchnorm_layers(qmodel)
    frozen = [(int(bn.freeze_switch.numpy()), bn.freezable) for bn in bns]
    count = 0
    try:
        set_switches(qmodel, freeze=True)
        for count, x in enumerate(images, 1):
            for q in quantizers:  # the first batch is taken as is ("seen" is 0)
                q.ema_decay = 1.0 - 1.0 / count
            qmodel(x, training=True)
    finally:
        for q, decay in saved:
            q.ema_decay = decay
        for bn, (was, freezable) in zip(bns, frozen, strict=True):
            bn.freeze_switch.assign(was)
            bn.freezable = freezable
    return count


def simulated_ptq_model(float_model: tf_keras.Model, settings: QuantConfig,
                        calibration: np.ndarray, batch_size: int) -> tf_keras.Model:
    """`float_model` quantized with `settings` (EMA ranges whatever `settings.range` says: PTQ
    trains nothing) and calibrated on `calibration`, in batches of `batch_size`."""
    qmodel = quantize_model(float_model, dataclasses.replace(settings, range="ema"))
    calibrate(qmodel, (calibration[i:i + batch_size]
                       for i in range(0, len(calibration), batch_size)))
    return qmodel
