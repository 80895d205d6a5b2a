"""BN re-estimation: after QAT, recompute every BN's moving statistics with the quantized model.

During QAT the moving averages trail weights and ranges that kept changing; at 4 bits and in
depthwise layers the gap shows in the folded file (AIMET; Nagel et al. 2022). Re-estimation runs
the quantized model in training mode over N batches and sets each moving mean and variance to
the exact average of its N batch statistics: the fused kernel's own moving-average update with
factor 1/k at batch k. Nothing else changes: every other variable (weights, quantizer ranges,
switches) is restored afterwards, and the layers' momentum and freeze switches too.

One exception: a BN folded into a *per-tensor* kernel grid (a Dense before BN, see
`FoldedKernelQuantizer`) keeps its moving variance, and its mean is measured with that variance
in place. There the variance is no statistic of the layer's output but part of its weights: it
sets the fold scale gamma/sqrt(var+eps), hence the one grid step max|W·s| and which weights round
to 0, so the int8 file computes x·fq(W·s) + bias whatever the variance measures. Re-estimating it
changes the grid after every batch (measurements under one grid, the file under another); with
a per-channel grid fq(W·s)/s = fq(W), and the variance is re-estimated as any other.
"""

from __future__ import annotations

from collections.abc import Iterable

import tf_keras

from qat.layers import QuantBatchNorm, batchnorm_layers
from qat.quantize import FoldedKernelQuantizer


def grid_setting_batchnorms(model: tf_keras.Model) -> list[QuantBatchNorm]:
    """The BNs folded into a per-tensor kernel quantizer: their moving variance sets the
    kernel's quantization grid (`FoldedKernelQuantizer` with `per_channel=False`)."""
    found = {}
    for layer in model.submodules:
        for _, quantizer, _ in getattr(layer, "_weight_vars", []):  # tfmot's wrappers
            if isinstance(quantizer, FoldedKernelQuantizer) and not quantizer.per_channel:
                bn = quantizer.bn
                if bn is not None:
                    found[id(bn)] = bn
    return list(found.values())


def reestimate_bn_statistics(model: tf_keras.Model, images: Iterable) -> int:
    """Re-estimate the moving statistics of every trainable QuantBatchNorm in `model` from the
    batches of `images` (eager, one batch at a time); returns the number of batches used.
    A BN that sets a per-tensor folded grid gets its mean only (`grid_setting_batchnorms`)."""
    bns: list[QuantBatchNorm] = [bn for bn in batchnorm_layers(model) if bn.trainable]
    grid = {id(bn) for bn in grid_setting_batchnorms(model)}
    held = [(bn.moving_variance, bn.moving_variance.numpy()) for bn in bns if id(bn) in grid]
    moving = {bn.moving_mean.ref() for bn in bns} | {
        bn.moving_variance.ref() for bn in bns if id(bn) not in grid}
    kept = [(v, v.numpy()) for v in model.variables if v.ref() not in moving]
    saved = [(bn.momentum, int(bn.freeze_switch.numpy())) for bn in bns]
    count = 0
    try:
        for bn in bns:
            bn.freeze_switch.assign(0)  # batch statistics, also for a frozen BN
        for count, x in enumerate(images, 1):
            for bn in bns:  # moving = (1 - 1/k)·moving + (1/k)·batch: the running mean
                bn.momentum = 1.0 - 1.0 / count
            model(x, training=True)
            for variable, value in held:  # the grid every batch (and the file) is measured on
                variable.assign(value)
    finally:
        for bn, (momentum, frozen) in zip(bns, saved, strict=True):
            bn.momentum = momentum
            bn.freeze_switch.assign(frozen)
        for variable, value in kept:  # EMA ranges and anything else training mode touched
            variable.assign(value)
    return count


class ReestimateBatchNorm(tf_keras.callbacks.Callback):
    """Re-estimate at the end of the last epoch, before that epoch's checkpoint is written
    (place it before qat's CheckpointEvery): the checkpoint and the export get the new stats."""

    def __init__(self, images_factory, batches: int):
        super().__init__()
        self.images_factory, self.batches = images_factory, batches

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.params.get("epochs"):
            images = (x for x, _ in self.images_factory().take(self.batches))
            reestimate_bn_statistics(self.model, images)
