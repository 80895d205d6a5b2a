"""Keras callbacks qat adds to `fit`: step timing for TensorBoard, loud NaN stops, checkpoints."""

from __future__ import annotations

import math
import time

import numpy as np
import tensorflow as tf
import tf_keras

from qat.layers import set_switches


class StepTimer(tf_keras.callbacks.Callback):
    """Times every train batch; logs per-epoch median `step_time_ms` and `examples_per_sec`.

    The first batch of each epoch is left out (tracing, iterator start-up). Each batch end waits
    for the loss value, so the time is the device's, not the Python dispatch's.
    """

    def __init__(self, log_dir: str, batch_size: int):
        super().__init__()
        self.batch_size = batch_size
        self.writer = tf.summary.create_file_writer(log_dir)
        self.all_ms: list[float] = []
        self._epoch_ms: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_ms = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if logs and "loss" in logs:
            float(logs["loss"])  # synchronize with the device
        elapsed_ms = (time.perf_counter() - self._start) * 1e3
        if batch > 0:
            self._epoch_ms.append(elapsed_ms)

    def on_epoch_end(self, epoch, logs=None):
        if not self._epoch_ms:
            return
        self.all_ms.extend(self._epoch_ms)
        median = float(np.median(self._epoch_ms))
        with self.writer.as_default():
            tf.summary.scalar("step_time_ms", median, step=epoch)
            tf.summary.scalar("examples_per_sec", self.batch_size / (median / 1e3), step=epoch)
        self.writer.flush()

    @property
    def median_ms(self) -> float:
        return float(np.median(self.all_ms)) if self.all_ms else float("nan")


class StopOnNonFinite(tf_keras.callbacks.Callback):
    """Stops at the first NaN/Inf loss and remembers the step, so the phase can fail loudly.

    Keras' TerminateOnNaN only stops: `fit` then returns normally and the run looks finished.
    """

    def __init__(self):
        super().__init__()
        self.bad_step: int | None = None

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            self.bad_step = int(self.model.optimizer.iterations.numpy())
            self.model.stop_training = True


class CheckpointEvery(tf_keras.callbacks.Callback):
    """Writes the phase's checkpoint (model, optimizer, epoch) at the end of every healthy epoch.

    TensorFlow writes checkpoint shards to a temporary name and updates the `checkpoint` state
    file atomically, so a kill during a save leaves the previous checkpoint as the latest.
    """

    def __init__(self, manager: tf.train.CheckpointManager, epoch_var: tf.Variable,
                 guard: StopOnNonFinite | None = None):
        super().__init__()
        self.manager = manager
        self.epoch_var = epoch_var
        self.guard = guard

    def on_epoch_end(self, epoch, logs=None):
        if self.guard is None or self.guard.bad_step is None:
            self.epoch_var.assign(epoch + 1)
            self.manager.save(checkpoint_number=int(self.model.optimizer.iterations.numpy()))


class FreezeBatchNormAfter(tf_keras.callbacks.Callback):
    """Turns every BN's freeze switch on once the optimizer has taken `after_steps` steps."""

    def __init__(self, bn_layers: list, after_steps: int):
        super().__init__()
        self.bn_layers = bn_layers
        self.after_steps = after_steps
        self.frozen = False

    def on_train_begin(self, logs=None):
        for layer in self.bn_layers:  # the step fit traces must read the freeze switch
            layer.freezable = True
        self.model.make_train_function(force=True)

    def on_train_batch_begin(self, batch, logs=None):
        if not self.frozen and int(self.model.optimizer.iterations.numpy()) >= self.after_steps:
            set_switches(self.model, freeze=True, layers=self.bn_layers)
            self.frozen = True
